"""ffprobe → a typed description of the source (`MediaInfo`), with the input locked down.

Both ffprobe and ffmpeg open the source with the same `input_args`: only the local file
(`file:` + absolute path, `-protocol_whitelist file`) and only real container demuxers
(`-format_whitelist`), so a playlist or concat script disguised as a video can never make
them read another file or a URL.

A single still picture (a PNG, JPEG, WebP... file, or a file whose only stream is a cover
picture) is a `still` source: it becomes a short still video (`STILL_DURATION_S`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transcoder.errors import (
    CancelledError,
    MediaError,
    SourceTooLargeError,
    StalledError,
    UnsupportedMediaError,
)
from transcoder.runner import die_with_parent
from transcoder.settings import Settings

#: container demuxers a source may be read with. ffmpeg matches each comma-separated part of
#: a demuxer's name ("mov,mp4,m4a,3gp,3g2,mj2") against this list, so "mov" admits that one.
#: Deliberately absent: hls, dash, imf, concat, lavfi, tty, sdp, rtsp, vobsub,
#: webm_dash_manifest, capture devices, subtitle and playlist formats: anything that can name
#: other files, URLs or devices.
#: single-picture demuxers: every `*_pipe` demuxer reads only the stream it is given; `image2`
#: would expand `%d` patterns and globs in the name into other files, so it is only ever used
#: with `-pattern_type none`. svg is left out: an SVG may reference other files; gif_pipe too:
#: the `gif` demuxer reads GIFs, animations included.
IMAGE_DEMUXERS = (
    "image2",  # only ever with `-pattern_type none` (see `input_args`)
    "png_pipe",
    "jpeg_pipe",
    "webp_pipe",
    "bmp_pipe",
    "tiff_pipe",
    "j2k_pipe",
    "jpegls_pipe",
    "jpegxl_pipe",
    "qoi_pipe",
    "pam_pipe",
    "pbm_pipe",
    "pgm_pipe",
    "ppm_pipe",
    "pcx_pipe",
    "psd_pipe",
    "sgi_pipe",
    "dpx_pipe",
    "exr_pipe",
    "xwd_pipe",
    "sunrast_pipe",
)
#: demuxers that read playlists or scripts naming other files or URLs: refused, and said so
_REFERENCING_DEMUXERS = frozenset(
    {"hls", "applehttp", "concat", "dash", "imf", "sdp", "rtsp", "rtp", "svg_pipe"}
    | {"webm_dash_manifest"}
)
SAFE_DEMUXERS = (
    "mov",
    "matroska",
    "avi",
    "flv",
    "live_flv",
    "mpegts",
    "mpeg",
    "mpegvideo",
    "m4v",
    "h264",
    "hevc",
    "ogg",
    "asf",
    "mxf",
    "dv",
    "nut",
    "rm",
    "ivf",
    "yuv4mpegpipe",
    "gif",
    "wav",
    "w64",
    "aiff",
    "caf",
    "flac",
    "mp3",
    "aac",
    "ac3",
    "eac3",
    "amr",
    "wv",
    "ape",
    "tta",
    "au",
    "dts",
    "dtshd",
    "truehd",
    "loas",
    "mjpeg",
    "apng",
    "vc1",
    "obu",
    "mpegtsraw",
    "wtv",
    "swf",
    "gxf",
    "nuv",
    *IMAGE_DEMUXERS,
)
#: how long the still video made from a single picture lasts
STILL_DURATION_S = 1.0
#: a source that claims to last so long that each second would hold fewer bytes than this is
#: lying (no codec gets near it: even AMR-NB speech needs ~600 B/s): its claimed duration is
#: treated as unknown instead of being trusted for progress or refused against the limit
MIN_BYTES_PER_SECOND = 16

#: read at most this much of the source to find its streams (bounded, but roomy enough for
#: files whose audio starts late)
PROBE_SIZE_BYTES = 50_000_000
ANALYZE_DURATION_US = 20_000_000
#: packets ffprobe reports from the start of the source
PROBE_PACKETS = 24
_KINDS = ("video", "audio", "subtitle", "data", "attachment")


def input_args(source: Path, format_name: str | None = None) -> list[str]:
    """The locked-down input options plus `-i file:/abs/path`, shared by ffprobe and ffmpeg.

    `format_name` is what ffprobe found: a single picture that ffprobe read with `image2`
    (which it picks for a `.jpg` name) is pinned to `image2` with `-pattern_type none`, so a
    `%d` or `*` in its name is never expanded into other files. (ffprobe always gets
    `-pattern_type none`; ffmpeg refuses the option for any other demuxer.)
    """
    pinned = ["-f", "image2", "-pattern_type", "none"] if format_name == "image2" else []
    return [
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        ",".join(SAFE_DEMUXERS),
        *pinned,
        "-probesize",
        str(PROBE_SIZE_BYTES),
        "-analyzeduration",
        str(ANALYZE_DURATION_US),
        "-i",
        "file:" + str(source.resolve()),
    ]


@dataclass(frozen=True)
class StreamInfo:
    """One stream of the source, as far as planning needs it."""

    index: int
    kind: str  # video | audio | subtitle | data | attachment
    codec: str
    width: int | None = None
    height: int | None = None
    pix_fmt: str | None = None
    #: degrees a player turns the picture (display matrix): 0, 90, 180 or 270
    rotation: int = 0
    frame_rate: str | None = None  # average rate as ffprobe's fraction, e.g. "30000/1001"
    base_frame_rate: str | None = None  # the lowest rate all timestamps fit (r_frame_rate)
    variable_frame_rate: bool = False
    has_b_frames: bool = False
    channels: int | None = None
    sample_rate: int | None = None
    attached_pic: bool = False  # a cover picture, never the main video
    default: bool = False
    #: where the stream ends (start + duration) when ffprobe knows both
    end_s: float | None = None

    @property
    def frame_rate_fps(self) -> float | None:
        return fraction_value(self.frame_rate)


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe found in the source."""

    path: Path
    format_name: str
    duration_s: float  # 0.0 when unknown
    size_bytes: int
    streams: tuple[StreamInfo, ...]
    #: a single picture (an image file, or only a cover picture): made into a still video
    still: bool = False
    #: the duration the container claims, when it was not believed (see `MIN_BYTES_PER_SECOND`)
    claimed_duration_s: float | None = None
    #: seconds of video before the start that an edit list hides (a cut made without
    #: re-encoding, e.g. a trimmed phone video): the decoder drops them, a copy would not
    video_preroll_s: float = 0.0

    @property
    def video(self) -> StreamInfo | None:
        """The main video stream: a default-flagged one first; cover pictures count only when
        the source is nothing but one (`still`).

        Streams whose picture size ffprobe could not find are only a last resort.
        """
        videos = [
            s for s in self.streams if s.kind == "video" and (self.still or not s.attached_pic)
        ]
        return _pick(s for s in videos if s.width and s.height) or _pick(videos)

    @property
    def audio(self) -> StreamInfo | None:
        """The main audio stream: a default-flagged one first."""
        return _pick(s for s in self.streams if s.kind == "audio")

    @property
    def audio_overrun_s(self) -> float:
        """How much longer the main audio goes on than the main video (0 when not known)."""
        video, audio = self.video, self.audio
        if video is None or audio is None or video.end_s is None or audio.end_s is None:
            return 0.0
        return max(0.0, round(audio.end_s - video.end_s, 6))


def _pick(candidates: Any) -> StreamInfo | None:
    streams = list(candidates)
    for stream in streams:
        if stream.default:
            return stream
    return streams[0] if streams else None


def fraction_value(value: str | None) -> float | None:
    """ffprobe's "30000/1001" → 29.97; None for 0/0, N/A or anything not positive."""
    if not value or value in ("0/0", "N/A"):
        return None
    try:
        numerator, _, denominator = value.partition("/")
        result = float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return result if math.isfinite(result) and result > 0 else None


def _float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) and result >= 0 else None


def _rotation(raw: dict[str, Any]) -> int:
    """Rotation from the display matrix (side data) or the legacy `rotate` tag, as 0..270.

    Only "is it turned" and "by a quarter turn" matter here: ffmpeg's autorotate does the
    actual turning when we encode.
    """
    degrees: float | None = None
    for side_data in raw.get("side_data_list") or []:
        if "rotation" in side_data:
            degrees = _float_signed(side_data["rotation"])
            break
    if degrees is None:
        degrees = _float_signed((raw.get("tags") or {}).get("rotate"))
    if degrees is None:
        return 0
    return round(degrees / 90.0) * 90 % 360


def _float_signed(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def parse_stream(raw: dict[str, Any]) -> StreamInfo | None:
    """One ffprobe stream entry → StreamInfo; None for a stream of unknown kind or codec."""
    kind = raw.get("codec_type")
    codec = raw.get("codec_name")
    if kind not in _KINDS or not codec or codec == "none":
        return None
    disposition = raw.get("disposition") or {}
    average = raw.get("avg_frame_rate")
    real = raw.get("r_frame_rate")
    average_fps, real_fps = fraction_value(average), fraction_value(real)
    return StreamInfo(
        index=int(raw["index"]),
        kind=str(kind),
        codec=str(codec),
        width=int(raw["width"]) if raw.get("width") else None,
        height=int(raw["height"]) if raw.get("height") else None,
        pix_fmt=raw.get("pix_fmt"),
        rotation=_rotation(raw),
        frame_rate=average if average_fps else (real if real_fps else None),
        base_frame_rate=real if real_fps else None,
        # ffprobe's tell for VFR: the base rate differs from the average one
        variable_frame_rate=bool(
            average_fps and real_fps and abs(average_fps - real_fps) > 0.01 * real_fps
        ),
        has_b_frames=bool(int(raw.get("has_b_frames") or 0)),
        channels=int(raw["channels"]) if raw.get("channels") else None,
        sample_rate=int(raw["sample_rate"]) if raw.get("sample_rate") else None,
        attached_pic=bool(disposition.get("attached_pic")),
        default=bool(disposition.get("default")),
        end_s=_end(raw),
    )


def _end(raw: dict[str, Any]) -> float | None:
    start, duration = _float_signed(raw.get("start_time")), _float(raw.get("duration"))
    return None if start is None or duration is None else round(start + duration, 6)


def parse_probe_output(path: Path, data: dict[str, Any], size_bytes: int) -> MediaInfo:
    """ffprobe's JSON (`-show_format -show_streams`) → MediaInfo, without checking limits."""
    fmt = data.get("format") or {}
    streams = tuple(
        stream for raw in data.get("streams") or [] if (stream := parse_stream(raw)) is not None
    )
    format_name = str(fmt.get("format_name") or "unknown")
    playable = [
        s for s in streams if s.kind == "audio" or (s.kind == "video" and not s.attached_pic)
    ]
    pictures = [s for s in streams if s.kind == "video" and s.attached_pic]
    still = format_name in IMAGE_DEMUXERS or (not playable and bool(pictures))
    duration, claimed = _duration(fmt, data.get("streams") or [], size_bytes)
    if still:
        duration, claimed = STILL_DURATION_S, None
    return MediaInfo(
        path=path,
        format_name=format_name,
        duration_s=duration,
        size_bytes=size_bytes,
        streams=streams,
        still=still,
        claimed_duration_s=claimed,
        video_preroll_s=_video_preroll(data.get("packets") or [], playable),
    )


def _video_preroll(packets: list[dict[str, Any]], playable: list[StreamInfo]) -> float:
    """How far before 0 the first video packets that are flagged "discard" (D) start.

    (Audio is not looked at: nearly every AAC track discards its encoder priming this way.)
    """
    videos = {s.index for s in playable if s.kind == "video"}
    preroll = 0.0
    for packet in packets:
        pts = _float_signed(packet.get("pts_time"))
        if packet.get("stream_index") in videos and "D" in str(packet.get("flags") or ""):
            if pts is not None and pts < 0:
                preroll = max(preroll, -pts)
    return round(preroll, 6)


def _duration(
    fmt: dict[str, Any], raw_streams: list[dict[str, Any]], size_bytes: int
) -> tuple[float, float | None]:
    """(duration to plan with, 0.0 = unknown; the claimed duration when it was not believed).

    The container's duration is only a header field: when it is far longer than every
    stream's own duration, the streams are believed; when even that leaves fewer than
    `MIN_BYTES_PER_SECOND` of data per second, the claim is treated as unknown.
    """
    playable = [
        raw
        for raw in raw_streams
        if raw.get("codec_type") in ("video", "audio")
        and not (raw.get("disposition") or {}).get("attached_pic")
    ]
    streams = [d for raw in playable if (d := _float(raw.get("duration")))]
    claimed = _float(fmt.get("duration")) or max(streams, default=0.0)
    duration = claimed
    if streams and len(streams) == len(playable) and claimed > 2 * max(streams) + 1:
        duration = max(streams)  # the container's own header disagrees with its streams
    if duration and size_bytes / duration < MIN_BYTES_PER_SECOND:
        duration = 0.0
    return duration, (claimed if duration != claimed else None)


def check_limits(media: MediaInfo, settings: Settings) -> MediaInfo:
    """Refuse sources nothing can transcode or that exceed the configured limits."""
    name = media.path.name
    video, audio = media.video, media.audio
    if video is None and audio is None:
        kinds = sorted({s.kind for s in media.streams})
        found = f"only {', '.join(kinds)} streams" if kinds else "no streams at all"
        raise UnsupportedMediaError(f"{name}: no audio or video to transcode ({found})")
    if video is not None:
        if not video.width or not video.height:
            raise UnsupportedMediaError(f"{name}: the video stream has no picture size")
        pixels = video.width * video.height
        if pixels > settings.max_pixels:
            raise SourceTooLargeError(
                f"{name}: picture {video.width}x{video.height} ({pixels} pixels) exceeds the "
                f"limit of {settings.max_pixels} pixels (TRANSCODER_MAX_PIXELS)"
            )
    # only a duration the data backs counts (an unbacked claim is `claimed_duration_s`):
    # a lying header is no reason to refuse, the job's time limit bounds the real work
    if media.duration_s > settings.max_duration_s:
        raise SourceTooLargeError(
            f"{name}: duration {media.duration_s:.0f} s exceeds the limit of "
            f"{settings.max_duration_s:.0f} s (TRANSCODER_MAX_DURATION_S)"
        )
    return media


#: box types an MP4/MOV file starts with; a file that has one but no moov was cut short
_ISO_BOX_TYPES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")


def _looks_like_mp4(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            head = file.read(12)
    except OSError:
        return False
    return head[4:8] in _ISO_BOX_TYPES


#: ffprobe's "[png_pipe @ 0x55c1...] Format not on whitelist 'mov,...'"
_REFUSED_FORMAT = re.compile(r"\[([\w,.-]+) @ 0x[0-9a-f]+\] Format not on whitelist")


def _reason(stderr: str, path: Path) -> tuple[type[MediaError], str]:
    """The error class and message for a source ffprobe could not open."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    refused = [line for line in lines if "not on whitelist" in line]
    if refused:
        match = _REFUSED_FORMAT.search(refused[0])
        demuxer = match.group(1) if match else ""
        if not demuxer or demuxer in _REFERENCING_DEMUXERS:
            return MediaError, (
                f"not a media file: {f'a {demuxer} ' if demuxer else 'a '}playlist or script "
                "that may reference other files or URLs is refused"
            )
        return UnsupportedMediaError, f"unsupported input format {demuxer!r}"
    if any("moov atom not found" in line for line in lines) and _looks_like_mp4(path):
        return MediaError, "truncated or incomplete file (no moov atom)"
    if any("Invalid data found" in line for line in lines):
        return MediaError, "not a media file (invalid data)"
    return MediaError, f"unreadable media ({lines[-1][:200] if lines else 'ffprobe failed'})"


def _run_probe(
    command: list[str], timeout_s: float, cancel: threading.Event | None, name: str
) -> tuple[bytes, bytes, int]:
    """Run ffprobe in its own process group; stop it on timeout or cancellation."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=0.1)
                return stdout, stderr, process.returncode
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    raise CancelledError("cancelled while probing the source") from None
                if time.monotonic() > deadline:
                    # like a stalled ffmpeg: maybe a starved or frozen host, so worth a retry
                    # (the retry budget bounds what a hostile file can cost)
                    raise StalledError(
                        f"{name}: probing took longer than {timeout_s:g} s and was stopped"
                    ) from None
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def probe(source: Path, settings: Settings, cancel: threading.Event | None = None) -> MediaInfo:
    """Describe `source`; raise MediaError (or a subclass) for anything unusable, StalledError
    when ffprobe takes longer than `probe_timeout_s`."""
    name = source.name
    try:
        size_bytes = source.stat().st_size
    except OSError as exc:
        raise MediaError(f"{name}: cannot read the source ({exc.strerror})") from exc
    if not source.is_file():
        raise MediaError(f"{name}: not a regular file")
    if size_bytes == 0:
        raise MediaError(f"{name}: empty file (0 bytes)")
    if size_bytes > settings.max_source_bytes:
        raise SourceTooLargeError(
            f"{name}: {size_bytes} bytes exceeds the limit of {settings.max_source_bytes} bytes"
        )
    command = [
        "ffprobe",
        "-v",
        "error",
        "-hide_banner",
        "-pattern_type",
        "none",  # image2: the file itself, never a sequence or glob it names
        *input_args(source),
        "-show_format",
        "-show_streams",
        # the first packets: flags and times show frames an edit list hides
        "-show_entries",
        "packet=stream_index,pts_time,flags",
        "-read_intervals",
        f"%+#{PROBE_PACKETS}",
        "-of",
        "json",
    ]
    stdout, stderr_bytes, returncode = _run_probe(command, settings.probe_timeout_s, cancel, name)
    stderr = stderr_bytes.decode("utf-8", "replace")
    if returncode != 0:
        error, reason = _reason(stderr, source)
        raise error(f"{name}: {reason}", stderr_tail=stderr[-2000:])
    try:
        data = json.loads(stdout or b"{}")
    except json.JSONDecodeError as exc:
        raise MediaError(f"{name}: ffprobe gave unreadable output") from exc
    return check_limits(parse_probe_output(source, data, size_bytes), settings)
