"""The hostile and odd input corpus, generated at test time (nothing is shipped).

Each `HostileCase` builds one source file and says what `transcoder run` must make of it:
`"ok"` (valid outputs), `"fail"` (a classified error) or `"either"`. The rule the corpus
keeps: a file that ffmpeg itself decodes cleanly (`ffmpeg -v error -i F -f null -` prints
nothing) is `"ok"`, except

- `hostile` cases (playlists and concat scripts disguised as media): plain ffmpeg would
  follow them, which is exactly what must never happen;
- `over_limit` cases: real media beyond a documented limit (`TRANSCODER_MAX_PIXELS`),
  refused on purpose with `SourceTooLargeError`.

`tests/test_hostile_run.py` checks both the rule (the corpus is honest) and the outcomes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: a short clip keeps every case fast; big enough for two HLS segments at 0.5 s
CLIP_S = 1.0
CLIP_SIZE = "160x120"


@dataclass(frozen=True)
class CorpusContext:
    """Where the corpus is built and the loopback port its URL cases name."""

    directory: Path
    listen_port: int

    @property
    def decoys(self) -> Path:
        """Real media files the disguised playlists name; nothing may ever open them."""
        return self.directory / "decoys"


@dataclass(frozen=True)
class HostileCase:
    name: str
    build: Callable[[CorpusContext], Path]
    #: "either": ffmpeg itself reports errors, so valid output and a classified failure
    #: are both acceptable (never a crash, a hang or a leftover)
    expect: Literal["ok", "fail", "either"]
    #: error types a "fail" may end with (the `ErrorType` of the one-line reason)
    errors: tuple[str, ...] = ("MediaError", "UnsupportedMediaError")
    #: a disguised playlist or script: plain ffmpeg would follow it
    hostile: bool = False
    #: decoy files (relative to the corpus directory) the source names
    names_files: tuple[str, ...] = ()
    #: the source names http://127.0.0.1:<listen_port>/...
    names_listener: bool = False
    #: the settings limit a real (cleanly decodable) file exceeds on purpose
    over_limit: str | None = None
    #: how long a valid output lasts (±0.15 s); None: not checked
    duration_s: float | None = CLIP_S
    notes: str = field(default="", compare=False)


# --- building blocks ------------------------------------------------------------------------


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; raise with its stderr if it fails."""
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")


def _lavfi_av(duration_s: float = CLIP_S, size: str = CLIP_SIZE, rate: int = 25) -> list[str]:
    return [
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate={rate}:duration={duration_s}",
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=440:sample_rate=48000:duration={duration_s}",
    ]


_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


def h264_aac(path: Path, *extra: str, duration_s: float = CLIP_S) -> Path:
    """A plain h264/aac clip (moov at the end, as ffmpeg writes it by default)."""
    ffmpeg(*_lavfi_av(duration_s), *_X264, "-c:a", "aac", *extra, str(path))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _decoy_ts(ctx: CorpusContext) -> Path:
    ctx.decoys.mkdir(exist_ok=True)
    path = ctx.decoys / "secret.ts"
    if not path.exists():
        ffmpeg(*_lavfi_av(), *_X264, "-c:a", "aac", "-f", "mpegts", str(path))
    return path


def _decoy_mp4(ctx: CorpusContext) -> Path:
    ctx.decoys.mkdir(exist_ok=True)
    path = ctx.decoys / "secret.mp4"
    if not path.exists():
        h264_aac(path)
    return path


# --- ISO BMFF (mp4/mov) box patching -------------------------------------------------------

_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def iter_boxes(
    data: bytes | bytearray, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, int, int]]:
    """Yield (type, offset, size) of every box, descending into the usual containers."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, offset + 8)[0]
            header = 16
        elif size == 0:
            size = end - offset
        if size < header:
            return
        yield kind, offset, size
        if kind in _CONTAINER_BOXES:
            yield from iter_boxes(data, offset + header, offset + size)
        offset += size


def patch_durations(path: Path, seconds: float) -> Path:
    """Make mvhd, every tkhd and every mdhd claim `seconds` (the samples stay as they are)."""
    data = bytearray(path.read_bytes())
    movie_timescale = 1000
    for kind, offset, _size in iter_boxes(data):
        if kind not in (b"mvhd", b"mdhd", b"tkhd"):
            continue
        version = data[offset + 8]
        if kind == b"tkhd":
            # tkhd counts in the movie's timescale and has no timescale of its own
            at = offset + (36 if version == 1 else 28)
            timescale = movie_timescale
        else:
            scale_at = offset + (28 if version == 1 else 20)
            timescale = struct.unpack_from(">I", data, scale_at)[0]
            at = scale_at + 4
            if kind == b"mvhd":
                movie_timescale = timescale
        ticks = round(seconds * timescale)
        if version == 1:
            struct.pack_into(">Q", data, at, ticks)
        else:
            struct.pack_into(">I", data, at, min(ticks, 0xFFFFFFFF))
    path.write_bytes(bytes(data))
    return path


def patch_dimensions(path: Path, width: int, height: int) -> Path:
    """Make the container (tkhd and the visual sample entry) claim width x height."""
    data = bytearray(path.read_bytes())
    for kind, offset, size in iter_boxes(data):
        if kind == b"tkhd":
            version = data[offset + 8]
            at = offset + (88 if version == 1 else 76)
            width_fixed, height_fixed = struct.unpack_from(">II", data, at)
            if width_fixed and height_fixed:  # a video track
                struct.pack_into(">II", data, at, width << 16, height << 16)
        elif kind == b"stsd":
            entry = offset + 16
            entry_kind = bytes(data[entry + 4 : entry + 8])
            if entry_kind in (b"avc1", b"hvc1", b"hev1", b"mp4v") and entry + 36 <= offset + size:
                struct.pack_into(">HH", data, entry + 32, width, height)
    path.write_bytes(bytes(data))
    return path


# --- the cases ------------------------------------------------------------------------------


def _zero_byte(ctx: CorpusContext) -> Path:
    return _write(ctx.directory / "zero_byte.mp4", b"")


def _random_bytes(ctx: CorpusContext) -> Path:
    # fixed content: a random run that happens to look like something would be a flaky test
    seed = b"transcoder-hostile-corpus"
    chunks = []
    block = seed
    for _ in range(2048):
        block = hashlib.sha256(block).digest()
        chunks.append(block)
    return _write(ctx.directory / "random_bytes.mp4", b"".join(chunks))


def _text(ctx: CorpusContext) -> Path:
    text = "This is not a video.\nIt is a shopping list: milk, eggs, ffmpeg.\n" * 50
    return _write(ctx.directory / "text.mp4", text.encode())


def _truncated_mp4(ctx: CorpusContext) -> Path:
    path = h264_aac(ctx.directory / "truncated_no_moov.mp4", duration_s=2.0)
    data = path.read_bytes()
    return _write(path, data[: len(data) // 2])  # moov is at the end: it is gone


def _truncated_ts(ctx: CorpusContext) -> Path:
    path = ctx.directory / "truncated.ts"
    ffmpeg(*_lavfi_av(2.0), *_X264, "-c:a", "aac", "-f", "mpegts", str(path))
    data = path.read_bytes()
    return _write(path, data[: (len(data) // 2) // 188 * 188 + 100])  # mid-packet


def _faststart_truncated(ctx: CorpusContext) -> Path:
    """moov first (as streaming tools write it), then the file cut: samples point past the end."""
    path = h264_aac(ctx.directory / "faststart_cut.mp4", "-movflags", "+faststart", duration_s=2.0)
    data = path.read_bytes()
    return _write(path, data[: len(data) * 2 // 3])


def _corrupted_middle(ctx: CorpusContext) -> Path:
    """Bit rot: 4 KB of the middle overwritten with garbage (container intact)."""
    path = h264_aac(ctx.directory / "bitrot.mp4", "-movflags", "+faststart", duration_s=2.0)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = hashlib.sha256(b"rot").digest() * 128
    return _write(path, bytes(data))


def _hls_local(extension: str, absolute: bool) -> Callable[[CorpusContext], Path]:
    def build(ctx: CorpusContext) -> Path:
        decoy = _decoy_ts(ctx) if extension == "ts" else _decoy_mp4(ctx)
        target = str(decoy) if absolute else f"decoys/{decoy.name}"
        playlist = (
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
            f"#EXTINF:1.0,\n{target}\n#EXT-X-ENDLIST\n"
        )
        kind = "abs" if absolute else "rel"
        return _write(ctx.directory / f"hls_local_{extension}_{kind}.mp4", playlist.encode())

    return build


def _ffconcat_local(ctx: CorpusContext) -> Path:
    _decoy_mp4(ctx)
    _decoy_ts(ctx)
    script = "ffconcat version 1.0\nfile 'decoys/secret.mp4'\nfile 'decoys/secret.ts'\n"
    return _write(ctx.directory / "ffconcat_local.mp4", script.encode())


def _hls_url(ctx: CorpusContext) -> Path:
    base = f"http://127.0.0.1:{ctx.listen_port}"
    playlist = (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n"
        f"#EXTINF:1.0,\n{base}/segment0.ts\n#EXTINF:1.0,\n{base}/segment1.mp4\n#EXT-X-ENDLIST\n"
    )
    return _write(ctx.directory / "hls_url.mp4", playlist.encode())


def _ffconcat_url(ctx: CorpusContext) -> Path:
    script = f"ffconcat version 1.0\nfile 'http://127.0.0.1:{ctx.listen_port}/clip.mp4'\n"
    return _write(ctx.directory / "ffconcat_url.mp4", script.encode())


def _real_playlist(ctx: CorpusContext) -> Path:
    """A genuine playlist under its own extension, its segment beside it: still refused."""
    decoy = _decoy_ts(ctx)
    playlist = (
        f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\ndecoys/{decoy.name}\n#EXT-X-ENDLIST\n"
    )
    return _write(ctx.directory / "playlist.m3u8", playlist.encode())


def _huge_frame(ctx: CorpusContext) -> Path:
    path = ctx.directory / "huge_12000x12000.mp4"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:size=12000x12000:rate=1",
        "-frames:v",
        "1",
        "-c:v",
        "mjpeg",
        "-q:v",
        "31",
        "-pix_fmt",
        "yuvj420p",
        str(path),
    )
    return path


def _claimed_dimensions(ctx: CorpusContext) -> Path:
    path = h264_aac(ctx.directory / "claims_12000x12000.mp4")
    return patch_dimensions(path, 12000, 12000)


def _claimed_duration(seconds: float, name: str) -> Callable[[CorpusContext], Path]:
    def build(ctx: CorpusContext) -> Path:
        return patch_durations(h264_aac(ctx.directory / name), seconds)

    return build


def _many_streams(ctx: CorpusContext) -> Path:
    base = h264_aac(ctx.directory / "many_streams_base.mp4")
    path = ctx.directory / "streams_201.mp4"
    maps = ["-map", "0:v"] + ["-map", "0:a"] * 200
    ffmpeg("-i", str(base), *maps, "-c", "copy", str(path))
    base.unlink()
    return path


def _audio_only(ctx: CorpusContext) -> Path:
    path = ctx.directory / "audio_only.m4a"
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=440:duration={CLIP_S}", "-c:a", "aac", str(path))
    return path


def _cover(ctx: CorpusContext) -> Path:
    path = ctx.directory / "parts" / "cover.png"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1", str(path))
    return path


def _cover_only(ctx: CorpusContext) -> Path:
    path = ctx.directory / "cover_only.mp4"
    cover = _cover(ctx)
    ffmpeg(
        "-i", str(cover), "-map", "0", "-c:v", "mjpeg", "-disposition:v", "attached_pic", str(path)
    )
    return path


def _audio_with_cover(ctx: CorpusContext) -> Path:
    path = ctx.directory / "audio_with_cover.m4a"
    cover = _cover(ctx)
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=440:duration={CLIP_S}",
        "-i",
        str(cover),
        "-map",
        "0",
        "-map",
        "1",
        "-c:a",
        "aac",
        "-c:v",
        "mjpeg",
        "-disposition:v:0",
        "attached_pic",
        str(path),
    )
    return path


def _odd_dimensions(ctx: CorpusContext) -> Path:
    # 4:2:0 cannot hold odd sizes in x264; 4:4:4 can (and is a non-4:2:0 source too)
    path = ctx.directory / "odd_321x241.mp4"
    ffmpeg(
        *_lavfi_av(size="321x241"),
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv444p",
        "-c:a",
        "aac",
        str(path),
    )
    return path


def _hevc_10bit(ctx: CorpusContext) -> Path:
    path = ctx.directory / "hevc_10bit.mp4"
    ffmpeg(
        *_lavfi_av(),
        "-c:v",
        "libx265",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p10le",
        "-x265-params",
        "log-level=error",
        "-tag:v",
        "hvc1",
        "-c:a",
        "aac",
        str(path),
    )
    return path


def _vp9_10bit(ctx: CorpusContext) -> Path:
    path = ctx.directory / "vp9_10bit.webm"
    ffmpeg(
        *_lavfi_av(),
        "-c:v",
        "libvpx-vp9",
        "-pix_fmt",
        "yuv420p10le",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-b:v",
        "300k",
        "-c:a",
        "libopus",
        str(path),
    )
    return path


def _rotated(ctx: CorpusContext) -> Path:
    base = h264_aac(ctx.directory / "rotated_base.mp4")
    path = ctx.directory / "rotated_90.mp4"
    # ffmpeg 5.1 still turns the legacy `rotate` tag into a display matrix when copying
    ffmpeg("-i", str(base), "-map", "0", "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path))
    base.unlink()
    return path


def _variable_frame_rate(ctx: CorpusContext) -> Path:
    path = ctx.directory / "vfr.mp4"
    ffmpeg(
        *_lavfi_av(2.0, rate=30),
        # keep 4 frames of every 7: gaps in the timestamps, an average rate of ~17 fps on a
        # 30 fps time base (ffprobe's tell for VFR: avg_frame_rate != r_frame_rate)
        "-vf",
        "select='lt(mod(n,7),4)'",
        "-fps_mode",
        "vfr",
        *_X264,
        "-c:a",
        "aac",
        str(path),
    )
    return path


# --- odd but real: what cameras, phones, editors and old tools write -------------------------


def _clip(
    name: str,
    *output_args: str,
    size: str = CLIP_SIZE,
    rate: str = "25",
    duration_s: float = CLIP_S,
    video: bool = True,
    audio: str | None = "sine=frequency=440:sample_rate=48000",
    before_audio: tuple[str, ...] = (),
    extra_inputs: tuple[str, ...] = (),
) -> Callable[[CorpusContext], Path]:
    """A builder: lavfi test video and/or audio, encoded with `output_args` into `name`."""

    def build(ctx: CorpusContext) -> Path:
        path = ctx.directory / name
        inputs: list[str] = []
        if video:
            source = f"testsrc2=size={size}:rate={rate}:duration={duration_s}"
            inputs += ["-f", "lavfi", "-i", source]
        if audio:
            inputs += [*before_audio, "-f", "lavfi", "-i", f"{audio}:duration={duration_s}"]
        ffmpeg(*inputs, *extra_inputs, *output_args, str(path))
        return path

    return build


def _mkv_subtitles_attachments(ctx: CorpusContext) -> Path:
    subtitles = ctx.directory / "parts" / "subs.srt"
    subtitles.parent.mkdir(exist_ok=True)
    subtitles.write_text("1\n00:00:00,000 --> 00:00:00,800\nHello\n")
    path = ctx.directory / "subs_two_audio_attachment.mkv"
    ffmpeg(
        *_lavfi_av(),
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=880:sample_rate=44100:duration={CLIP_S}",
        "-i",
        str(subtitles),
        "-map",
        "0:v",
        "-map",
        "1:a",
        "-map",
        "2:a",
        "-map",
        "3:s",
        *_X264,
        "-c:a:0",
        "aac",
        "-c:a:1",
        "ac3",
        "-c:s",
        "srt",
        "-metadata:s:a:0",
        "language=eng",
        "-metadata:s:a:1",
        "language=fra",
        "-attach",
        str(_cover(ctx)),
        "-metadata:s:t",
        "mimetype=image/png",
        str(path),
    )
    return path


_AAC = ("-c:a", "aac")
ODD_REAL_WORLD: tuple[HostileCase, ...] = (
    HostileCase(
        "av1_opus_mp4",
        _clip("av1_opus.mp4", "-c:v", "libsvtav1", "-preset", "12", "-c:a", "libopus"),
        "ok",
    ),
    HostileCase(
        "mpeg2_interlaced_mpg",
        _clip(
            "interlaced.mpg",
            "-c:v",
            "mpeg2video",
            "-flags",
            "+ilme+ildct",
            "-b:v",
            "2M",
            "-c:a",
            "mp2",
            size="320x240",
        ),
        "ok",
    ),
    HostileCase("mkv_subtitles_two_audio_attachment", _mkv_subtitles_attachments, "ok"),
    HostileCase(
        "mov_pcm24_timecode",
        _clip("pcm_timecode.mov", *_X264, "-c:a", "pcm_s24le", "-timecode", "01:00:00:00"),
        "ok",
    ),
    HostileCase(
        "prores_422_10bit_mov",
        _clip(
            "prores.mov",
            "-c:v",
            "prores_ks",
            "-profile:v",
            "0",
            "-pix_fmt",
            "yuv422p10le",
            "-c:a",
            "pcm_s16le",
        ),
        "ok",
    ),
    HostileCase("wmv2_wmav2_asf", _clip("old.wmv", "-c:v", "wmv2", "-c:a", "wmav2"), "ok"),
    HostileCase(
        "mjpeg_pcm_avi",
        _clip("camera.avi", "-c:v", "mjpeg", "-q:v", "5", "-c:a", "pcm_s16le"),
        "ok",
    ),
    HostileCase(
        "dv_ntsc_anamorphic",
        _clip(
            "tape.dv",
            "-c:v",
            "dvvideo",
            "-pix_fmt",
            "yuv411p",
            "-c:a",
            "pcm_s16le",
            "-ar",
            "48000",
            "-ac",
            "2",
            size="720x480",
            rate="30000/1001",
            duration_s=0.5,
        ),
        "ok",
        duration_s=0.5,
    ),
    HostileCase("gif_animated", _clip("animated.gif", audio=None), "ok"),
    HostileCase(
        "surround_5_1_aac",
        _clip("surround.mp4", *_X264, *_AAC, "-af", "pan=5.1|c0=c0|c1=c0|c2=c0|c3=c0|c4=c0|c5=c0"),
        "ok",
    ),
    HostileCase("video_only", _clip("video_only.mp4", *_X264, audio=None), "ok"),
    HostileCase(
        "audio_starts_late",
        _clip("late_audio.mp4", *_X264, *_AAC, before_audio=("-itsoffset", "0.5")),
        "ok",
        duration_s=None,
        notes="audio 0.5-1.5 s over 1 s of video; HLS EXTINF counts the video only",
    ),
    HostileCase(
        "hevc_hev1_tag",
        _clip(
            "hev1.mp4",
            "-c:v",
            "libx265",
            "-preset",
            "ultrafast",
            "-x265-params",
            "log-level=error",
            "-tag:v",
            "hev1",
            *_AAC,
        ),
        "ok",
    ),
    HostileCase(
        "h264_422_10bit",
        _clip(
            "h264_422_10.mov",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv422p10le",
            *_AAC,
        ),
        "ok",
    ),
    HostileCase(
        "h264_full_range_ntsc_rate",
        _clip(
            "fullrange.mp4",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuvj420p",
            *_AAC,
            rate="24000/1001",
        ),
        "ok",
    ),
    HostileCase(
        "single_frame_h264",
        _clip("one_frame.mp4", *_X264, "-frames:v", "1", audio=None),
        "ok",
        duration_s=None,
    ),
    HostileCase(
        "mono_8khz_aac",
        _clip("phone.mp4", *_X264, *_AAC, "-ac", "1", "-ar", "8000"),
        "ok",
    ),
    HostileCase(
        "theora_vorbis_ogv",
        _clip("open.ogv", "-c:v", "libtheora", "-q:v", "5", "-c:a", "libvorbis"),
        "ok",
    ),
    HostileCase(
        "flv1_mp3_flv", _clip("old.flv", "-c:v", "flv1", "-c:a", "libmp3lame", "-ar", "44100"), "ok"
    ),
    HostileCase(
        "h263_3gp",
        _clip(
            "phone.3gp",
            "-c:v",
            "h263",
            *_AAC,
            "-ar",
            "16000",
            "-ac",
            "1",
            size="176x144",
            rate="15",
        ),
        "ok",
    ),
    HostileCase(
        "uhd_3840x2160",
        _clip("uhd.mp4", *_X264, *_AAC, size="3840x2160", duration_s=0.2),
        "ok",
        duration_s=0.2,
    ),
    HostileCase("ffv1_flac_mkv", _clip("archive.mkv", "-c:v", "ffv1", "-c:a", "flac"), "ok"),
)


CORPUS: tuple[HostileCase, ...] = (
    HostileCase("zero_byte", _zero_byte, "fail"),
    HostileCase("random_bytes", _random_bytes, "fail"),
    HostileCase("text", _text, "fail"),
    HostileCase("truncated_mp4_no_moov", _truncated_mp4, "fail"),
    HostileCase(
        "truncated_ts",
        _truncated_ts,
        "either",
        notes="cut mid-packet: ffmpeg decodes up to the cut, then reports a corrupt macroblock",
    ),
    HostileCase("faststart_truncated", _faststart_truncated, "either"),
    HostileCase("corrupted_middle", _corrupted_middle, "either"),
    HostileCase(
        "hls_local_ts_relative",
        _hls_local("ts", absolute=False),
        "fail",
        hostile=True,
        names_files=("decoys/secret.ts",),
    ),
    HostileCase(
        "hls_local_ts_absolute",
        _hls_local("ts", absolute=True),
        "fail",
        hostile=True,
        names_files=("decoys/secret.ts",),
    ),
    HostileCase(
        "hls_local_mp4_relative",
        _hls_local("mp4", absolute=False),
        "fail",
        hostile=True,
        names_files=("decoys/secret.mp4",),
    ),
    HostileCase(
        "ffconcat_local",
        _ffconcat_local,
        "fail",
        hostile=True,
        names_files=("decoys/secret.mp4", "decoys/secret.ts"),
    ),
    HostileCase("hls_loopback_url", _hls_url, "fail", hostile=True, names_listener=True),
    HostileCase("ffconcat_loopback_url", _ffconcat_url, "fail", hostile=True, names_listener=True),
    HostileCase(
        "real_playlist_m3u8",
        _real_playlist,
        "fail",
        hostile=True,
        names_files=("decoys/secret.ts",),
    ),
    HostileCase(
        "huge_frame_12000x12000",
        _huge_frame,
        "fail",
        errors=("SourceTooLargeError",),
        over_limit="TRANSCODER_MAX_PIXELS",
    ),
    HostileCase(
        "claims_12000x12000",
        _claimed_dimensions,
        "ok",
        notes="container boxes lie; the h264 stream is 160x120",
    ),
    HostileCase(
        "claims_10h_duration",
        _claimed_duration(10 * 3600, "claims_10h.mp4"),
        "ok",
        notes="1 s of samples, headers claim 10 h",
    ),
    HostileCase(
        "claims_49d_duration",
        _claimed_duration(49 * 86400, "claims_49d.mp4"),
        "ok",
        notes="1 s of samples, headers claim 49 days (beyond TRANSCODER_MAX_DURATION_S): the "
        "samples, not the header, say how long the source is",
    ),
    HostileCase("streams_201", _many_streams, "ok", notes="1 video and 200 audio streams"),
    HostileCase("audio_only", _audio_only, "ok"),
    HostileCase("audio_with_cover", _audio_with_cover, "ok"),
    HostileCase("cover_only", _cover_only, "ok", notes="a single attached picture, no a/v"),
    HostileCase("odd_321x241_yuv444p", _odd_dimensions, "ok"),
    HostileCase("hevc_10bit", _hevc_10bit, "ok"),
    HostileCase("vp9_10bit", _vp9_10bit, "ok"),
    HostileCase("rotated_90", _rotated, "ok"),
    HostileCase("variable_frame_rate", _variable_frame_rate, "ok", duration_s=2.0),
    *ODD_REAL_WORLD,
)

CASES = {case.name: case for case in CORPUS}


def build_corpus(directory: Path, listen_port: int) -> dict[str, Path]:
    """Build every case into `directory`; returns name → source path."""
    directory.mkdir(parents=True, exist_ok=True)
    ctx = CorpusContext(directory, listen_port)
    return {case.name: case.build(ctx) for case in CORPUS}


def decodes_cleanly(path: Path, timeout_s: float = 60) -> bool:
    """ffmpeg's own verdict: the whole file decodes with not a single error line."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        cwd=path.parent,
        env={**os.environ, "http_proxy": "", "https_proxy": ""},
    )
    return result.returncode == 0 and not result.stderr.strip()
