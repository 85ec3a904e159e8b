"""Source description + formats + options → ONE ffmpeg command with one output per format.

Pure functions: no processes, no file system; `tests/test_plan.py` checks them with a table of
source x format cases. Per output and per stream the plan decides *copy* (remux, near free) or
*encode* (the format's default encoder, or the requested one), and maps streams explicitly so
cover pictures, subtitles and data streams never sneak in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transcoder.errors import RequestError
from transcoder.formats import ENCODER_CODECS, ContainerFormat, accepts_video_copy, get_format
from transcoder.models import EncodingOptions, normalize_formats
from transcoder.probe import STILL_DURATION_S, MediaInfo, StreamInfo, fraction_value, input_args
from transcoder.settings import Settings

#: encoder aliases a request may use
_ENCODER_ALIASES = {"mp3": "libmp3lame", "opus": "libopus"}
#: most channels each audio encoder handles reliably (libopus trips over 5.1(side) layouts)
_ENCODER_MAX_CHANNELS = {"libmp3lame": 2, "libopus": 2, "aac": 8}
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
#: enough buffered packets for sources whose streams start far apart
MAX_MUXING_QUEUE_SIZE = 4096
#: below this sample rate, audio encoded for a container without edit lists is resampled
_MIN_SAMPLE_RATE = 32000
#: audio that goes on longer than this after the video ends gets the last picture held (HLS)
MAX_AUDIO_OVERRUN_S = 0.25
#: frame rate of the still video made from a single picture
STILL_FRAME_RATE = 25


@dataclass(frozen=True)
class OutputPlan:
    """One output of the command: where ffmpeg writes it and where it ends up."""

    format: str
    temp_path: Path  # what ffmpeg writes (for HLS: the playlist, segments beside it)
    final_path: Path
    video: str | None  # "copy" | "encode" | None (no video)
    audio: str | None
    args: tuple[str, ...]  # this output's part of the command, ending with its file


@dataclass(frozen=True)
class Plan:
    """The whole ffmpeg invocation."""

    command: list[str]
    outputs: list[OutputPlan]
    duration_s: float
    #: ffmpeg runs in this directory; outputs are named relative to it, so no part of the
    #: output path can be read as an ffmpeg pattern (`%d`) or protocol (`x:`)
    work_dir: Path


def segment_base_name(stem: str) -> str:
    """HLS segment base name: the stem, made safe for URIs and ffmpeg's `%d` patterns.

    Shortened so `{base}NNNNN.ts` stays far below the 255-byte file name limit.
    """
    return _UNSAFE_NAME_CHARS.sub("_", stem).lstrip(".")[:100] or "segment"


def _display_height(video: StreamInfo) -> int:
    """Height as shown: a 90°/270° rotation swaps the stored width and height."""
    if video.rotation in (90, 270):
        return video.width or 0
    return video.height or 0


def _encoder(
    requested: str | None, default: str, allowed: frozenset[str], what: str, fmt: str
) -> str:
    if requested is None:
        return default
    if requested not in allowed:
        choices = ", ".join(sorted(allowed))
        raise RequestError(f"{what} codec {requested!r} cannot be written to {fmt}: use {choices}")
    return _ENCODER_ALIASES.get(requested, requested)


def video_mode(
    fmt: ContainerFormat,
    video: StreamInfo,
    options: EncodingOptions,
    *,
    still: bool = False,
    preroll: bool = False,
    audio_overrun_s: float = 0.0,
) -> str:
    """Copy the source video into `fmt` when it fits untouched under the options, else encode.

    A single picture (`still`) is always encoded: it becomes a short still video. So is video
    with frames an edit list hides (`preroll`) for a container that cannot hide them too, and
    for HLS video that ends well before its audio (see `_hold_last_picture_s`).
    """
    if still or options.copy_policy == "never" or options.crf is not None or options.video_bitrate:
        return "encode"
    if preroll and not fmt.has_edit_lists:
        return "encode"
    if _hold_last_picture_s(fmt, audio_overrun_s):
        return "encode"
    if options.height is not None and _display_height(video) > options.height:
        return "encode"
    if options.video_codec and ENCODER_CODECS.get(options.video_codec) != video.codec:
        return "encode"
    if not accepts_video_copy(fmt, video.codec, video.pix_fmt):
        return "encode"
    if video.rotation and not fmt.keeps_rotation:
        return "encode"  # the container cannot say "turn this", so turn the pixels
    if fmt.needs_constant_frame_rate and (video.has_b_frames or video.variable_frame_rate):
        return "encode"
    if fmt.segmented and _unreliable_timing(video):
        return "encode"
    return "copy"


def _hold_last_picture_s(fmt: ContainerFormat, audio_overrun_s: float) -> float:
    """Seconds to hold the last picture for: HLS times each segment (#EXTINF) by its video
    alone, so audio going on after the video ends would fall off the playlist's timeline."""
    return audio_overrun_s if fmt.segmented and audio_overrun_s > MAX_AUDIO_OVERRUN_S else 0.0


def _unreliable_timing(video: StreamInfo) -> bool:
    """Variable frame rate with reordered frames: the packets' own durations may not add up
    to the stream's length (ffmpeg-made VFR H.264 says 1/30 s for every frame of a gappy
    stream), and the HLS muxer sums exactly those into each segment's #EXTINF."""
    return video.variable_frame_rate and video.has_b_frames


def audio_mode(
    fmt: ContainerFormat, audio: StreamInfo, options: EncodingOptions, *, preroll: bool = False
) -> str:
    """Copy the source audio into `fmt` when it fits untouched under the options, else encode.

    With a video `preroll` the audio of the hidden part goes too (it would play ahead).
    """
    if options.copy_policy == "never" or options.audio_bitrate:
        return "encode"
    if preroll and not fmt.has_edit_lists:
        return "encode"
    if options.audio_codec and ENCODER_CODECS.get(options.audio_codec) != audio.codec:
        return "encode"
    if audio.codec not in fmt.copy_audio:
        return "encode"
    if (audio.channels or 0) > fmt.max_audio_channels:
        return "encode"
    return "copy"


def _constant_rate(video: StreamInfo) -> str:
    """A frame rate for CFR containers: the source's base rate, else its average, if sane.

    The base rate keeps a VFR source's timing exact (no frame lands between two slots); a
    bogus one (90000 fps) or a timer-like one far above the average (GIFs: 100) is skipped.
    """
    base, average = fraction_value(video.base_frame_rate), fraction_value(video.frame_rate)
    candidates = [video.base_frame_rate, video.frame_rate]
    if base and average and base > 2 * average:
        candidates.reverse()
    for rate in candidates:
        fps = fraction_value(rate)
        if fps is None or not 1 <= fps <= 120:
            continue
        numerator = (rate or "").partition("/")[0]
        # mpeg4 refuses time bases with a denominator above 2^16 - 1 (odd VFR averages)
        if numerator.isdigit() and int(numerator) <= 65535:
            return str(rate)
        return f"{fps:.3f}"
    return "25"


def _video_encode_args(
    fmt: ContainerFormat,
    video: StreamInfo,
    options: EncodingOptions,
    settings: Settings,
    segment_s: float,
    *,
    still: bool = False,
    audio_overrun_s: float = 0.0,
) -> list[str]:
    encoder = _encoder(
        options.video_codec, fmt.video_encoder, fmt.video_encoders, "video", fmt.name
    )
    filters: list[str] = []
    hold_s = _hold_last_picture_s(fmt, audio_overrun_s)
    if hold_s:
        filters.append(f"tpad=stop_mode=clone:stop_duration={hold_s:.3f}")
    if still:
        # the first picture, repeated: a still video of STILL_DURATION_S at a constant rate
        # (a cover picture or an image has no timing of its own to keep)
        repeats = round(STILL_DURATION_S * STILL_FRAME_RATE) - 1
        filters.append(
            f"trim=end_frame=1,loop=loop={repeats}:size=1,setpts=N/{STILL_FRAME_RATE}/TB"
        )
    if options.height is not None and _display_height(video) > options.height:
        # never upscale; -2 keeps the aspect ratio with an even width
        filters.append(f"scale=-2:{options.height - options.height % 2}")
    elif (video.width or 0) % 2 or (video.height or 0) % 2:
        filters.append("scale=trunc(iw/2)*2:trunc(ih/2)*2")  # 4:2:0 encoders need even sizes
    # 8-bit 4:2:0 is what every player decodes (10-bit, 4:2:2, 4:4:4 and RGB are converted)
    filters.append("format=yuv420p")
    args = ["-c:v", encoder, "-vf", ",".join(filters)]
    if encoder == "libx264":
        args += ["-preset", "veryfast"]
        args += (
            ["-b:v", options.video_bitrate]
            if options.video_bitrate
            else ["-crf", str(options.crf if options.crf is not None else 23)]
        )
        if fmt.needs_constant_frame_rate:
            args += ["-bf", "0"]  # AVI has no presentation timestamps
    elif encoder == "libx265":
        args += ["-preset", "fast"]
        args += (
            ["-b:v", options.video_bitrate]
            if options.video_bitrate
            else ["-crf", str(options.crf if options.crf is not None else 28)]
        )
    elif encoder == "libvpx-vp9":
        args += ["-deadline", "good", "-cpu-used", "5", "-row-mt", "1"]
        args += (
            ["-b:v", options.video_bitrate]
            if options.video_bitrate
            else ["-crf", str(options.crf if options.crf is not None else 33), "-b:v", "0"]
        )
    else:  # mpeg4, flv1: fixed quantizer is fast and looks decent
        args += ["-b:v", options.video_bitrate] if options.video_bitrate else ["-q:v", "4"]
    tag = fmt.video_tags.get(ENCODER_CODECS.get(encoder, ""))
    if tag:
        args += ["-tag:v", tag]
    if still:
        # a cover picture's flag would make the muxer store the video as cover art
        args += ["-fps_mode", "cfr", "-r", str(STILL_FRAME_RATE), "-disposition:v", "default"]
    elif fmt.needs_constant_frame_rate or (fmt.segmented and _unreliable_timing(video)):
        args += ["-fps_mode", "cfr", "-r", _constant_rate(video)]
    else:
        # keep the source's timing; the default (cfr) would duplicate frames of VFR phone
        # videos, or explode on a bogus 90000 fps base rate
        args += ["-fps_mode", "vfr"]
    if fmt.segmented:
        # a keyframe at every segment boundary so segments have the requested length
        args += ["-force_key_frames", f"expr:gte(t,n_forced*{segment_s:g})"]
    if settings.ffmpeg_threads > 0:
        args += ["-threads", str(settings.ffmpeg_threads)]
    return args


def _audio_encode_args(
    fmt: ContainerFormat, audio: StreamInfo, options: EncodingOptions
) -> list[str]:
    encoder = _encoder(
        options.audio_codec, fmt.audio_encoder, fmt.audio_encoders, "audio", fmt.name
    )
    args = ["-c:a", encoder]
    if options.audio_bitrate:
        args += ["-b:a", options.audio_bitrate]
    elif encoder == "aac":
        args += ["-b:a", "128k"]
    elif encoder == "libmp3lame":
        args += ["-q:a", "4"]
    elif encoder == "libopus":
        args += ["-b:a", "96k"]
    max_channels = min(fmt.max_audio_channels, _ENCODER_MAX_CHANNELS.get(encoder, 8))
    if (audio.channels or 0) > max_channels:
        args += ["-ac", "2"]  # downmix what the container or encoder cannot carry
    if not fmt.has_edit_lists and 0 < (audio.sample_rate or 0) < _MIN_SAMPLE_RATE:
        # the encoder's priming (~1024 samples) plays where no edit list hides it: 0.13 s
        # of silence at telephone rates (8 kHz), 0.02 s at 48 kHz
        args += ["-ar", "48000"]
    return args


def _output(
    fmt: ContainerFormat,
    media: MediaInfo,
    options: EncodingOptions,
    settings: Settings,
    *,
    temp_dir: Path,
    out_dir: Path,
    stem: str,
) -> OutputPlan:
    video, audio = media.video, media.audio
    preroll = video is not None and media.video_preroll_s > 0
    segment_s = options.hls_segment_s or settings.hls_segment_s
    args: list[str] = []
    video_choice = audio_choice = None
    if video is not None:
        video_choice = video_mode(
            fmt,
            video,
            options,
            still=media.still,
            preroll=preroll,
            audio_overrun_s=media.audio_overrun_s,
        )
        args += ["-map", f"0:{video.index}"]
    if audio is not None:
        audio_choice = audio_mode(fmt, audio, options, preroll=preroll)
        args += ["-map", f"0:{audio.index}"]
    if video is not None:
        if video_choice == "copy":
            args += ["-c:v", "copy"]
            tag = fmt.video_tags.get(video.codec)
            if tag:
                args += ["-tag:v", tag]
        else:
            args += _video_encode_args(
                fmt,
                video,
                options,
                settings,
                segment_s,
                still=media.still,
                audio_overrun_s=media.audio_overrun_s,
            )
    if audio is not None:
        args += (
            ["-c:a", "copy"] if audio_choice == "copy" else _audio_encode_args(fmt, audio, options)
        )
    args += ["-max_muxing_queue_size", str(MAX_MUXING_QUEUE_SIZE), *fmt.muxer_args, "-f", fmt.muxer]
    base = segment_base_name(stem)
    temp_name = f"{base}.{fmt.extension}"
    if fmt.segmented:
        args += [
            "-hls_time",
            f"{segment_s:g}",
            "-hls_playlist_type",
            "vod",  # the whole list up front, ending with #EXT-X-ENDLIST
            "-hls_list_size",
            "0",
            "-hls_segment_type",
            "mpegts",
            "-hls_segment_filename",
            f"./{base}%03d.ts",  # the playlist names segments by basename
        ]
    args.append(f"file:{temp_name}")
    return OutputPlan(
        format=fmt.name,
        temp_path=temp_dir / temp_name,
        final_path=out_dir / f"{stem}.{fmt.extension}",
        video=video_choice,
        audio=audio_choice,
        args=tuple(args),
    )


def build_plan(
    media: MediaInfo,
    formats: Sequence[str],
    options: EncodingOptions,
    settings: Settings,
    *,
    temp_dir: Path,
    out_dir: Path,
    stem: str,
) -> Plan:
    """The single ffmpeg command that writes every format into `temp_dir`."""
    try:
        names = normalize_formats(list(formats))
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    for name in names:  # refuse impossible requests whatever the source turns out to be
        fmt = get_format(name)
        _encoder(options.video_codec, fmt.video_encoder, fmt.video_encoders, "video", fmt.name)
        _encoder(options.audio_codec, fmt.audio_encoder, fmt.audio_encoders, "audio", fmt.name)
    outputs = [
        _output(
            get_format(name),
            media,
            options,
            settings,
            temp_dir=temp_dir,
            out_dir=out_dir,
            stem=stem,
        )
        for name in names
    ]
    command = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-loglevel", "warning"]
    command += ["-nostats", "-progress", "pipe:1"]
    # decoders refuse pictures above the limit even if a stream changes size mid-file
    command += ["-max_pixels", str(min(settings.max_pixels, 2**31 - 1))]
    if settings.ffmpeg_threads > 0:
        command += ["-threads", str(settings.ffmpeg_threads)]
    command += input_args(media.path, media.format_name)
    # ffmpeg reports frames and fps of the first output only, and counts none for a copy:
    # outputs that encode video go first so progress shows a real fps
    for output in sorted(outputs, key=lambda output: output.video != "encode"):
        command += output.args
    return Plan(command=command, outputs=outputs, duration_s=media.duration_s, work_dir=temp_dir)
