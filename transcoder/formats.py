"""Every output format, in one table: the one place to add or change a format.

A `ContainerFormat` says how ffmpeg writes the format (muxer, extension, extra muxer options),
which encoders it uses by default, which source codecs it accepts as a stream copy, and the
content type its files are uploaded with. `transcoder.plan` reads this table; nothing else
knows format details.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: pixel formats every player decodes; 10-bit or 4:2:2/4:4:4 H.264 plays almost nowhere
EIGHT_BIT_420 = frozenset({"yuv420p", "yuvj420p"})
#: HEVC Main 10 (e.g. phone HDR) is as widely playable as 8-bit HEVC
HEVC_PIX_FMTS = EIGHT_BIT_420 | {"yuv420p10le"}

#: encoder name -> the codec name ffprobe reports for its output (to tell when copy suffices)
ENCODER_CODECS = {
    "libx264": "h264",
    "libx265": "hevc",
    "mpeg4": "mpeg4",
    "libvpx-vp9": "vp9",
    "flv1": "flv1",
    "aac": "aac",
    "libmp3lame": "mp3",
    "mp3": "mp3",
    "libopus": "opus",
    "opus": "opus",
    "pcm_s16le": "pcm_s16le",
}


@dataclass(frozen=True)
class ContainerFormat:
    """How one output format is written."""

    name: str
    muxer: str  # ffmpeg's `-f` name
    extension: str
    video_encoder: str  # used when the source video cannot be copied
    audio_encoder: str
    #: source video codec -> pixel formats that may be stream-copied into this container
    copy_video: dict[str, frozenset[str]]
    copy_audio: frozenset[str]
    #: encoders a request may choose for this format (others are refused with a clear message)
    video_encoders: frozenset[str]
    audio_encoders: frozenset[str]
    max_audio_channels: int
    content_type: str
    muxer_args: tuple[str, ...] = ()
    #: the container stores the display matrix, so a rotated source may be copied as is
    keeps_rotation: bool = False
    #: the container has edit lists: copied packets a source's edit list hides (the frames
    #: before a cut-without-re-encode) stay hidden; elsewhere they would play
    has_edit_lists: bool = False
    #: the container has no presentation timestamps: B-frames would need hacks, and the
    #: frame rate must be constant
    needs_constant_frame_rate: bool = False
    #: HLS: a playlist plus segments; the segments' content type
    segment_content_type: str | None = None
    #: per-codec tag for copied or encoded video (e.g. hvc1 so Apple players accept HEVC)
    video_tags: dict[str, str] = field(default_factory=dict)

    @property
    def segmented(self) -> bool:
        return self.segment_content_type is not None


_H264 = {"h264": EIGHT_BIT_420}
_H264_HEVC = {"h264": EIGHT_BIT_420, "hevc": HEVC_PIX_FMTS}

FORMAT_TABLE: dict[str, ContainerFormat] = {
    fmt.name: fmt
    for fmt in (
        ContainerFormat(
            name="mov",
            muxer="mov",
            extension="mov",
            video_encoder="libx264",
            audio_encoder="aac",
            copy_video={**_H264_HEVC, "mpeg4": EIGHT_BIT_420, "prores": frozenset()},
            copy_audio=frozenset({"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le"}),
            video_encoders=frozenset({"libx264", "libx265", "mpeg4"}),
            audio_encoders=frozenset({"aac", "libmp3lame", "mp3", "pcm_s16le"}),
            max_audio_channels=8,
            content_type="video/quicktime",
            # moov first: playback can start before the whole file is downloaded
            muxer_args=("-movflags", "+faststart"),
            keeps_rotation=True,
            has_edit_lists=True,
            video_tags={"hevc": "hvc1"},
        ),
        ContainerFormat(
            name="mp4",
            muxer="mp4",
            extension="mp4",
            video_encoder="libx264",
            audio_encoder="aac",
            copy_video={**_H264_HEVC, "mpeg4": EIGHT_BIT_420, "av1": frozenset()},
            copy_audio=frozenset({"aac", "mp3", "ac3", "eac3"}),
            video_encoders=frozenset({"libx264", "libx265", "mpeg4", "libvpx-vp9"}),
            audio_encoders=frozenset({"aac", "libmp3lame", "mp3", "libopus", "opus"}),
            max_audio_channels=8,
            content_type="video/mp4",
            muxer_args=("-movflags", "+faststart"),
            keeps_rotation=True,
            has_edit_lists=True,
            video_tags={"hevc": "hvc1"},
        ),
        ContainerFormat(
            name="flv",
            muxer="flv",
            extension="flv",
            video_encoder="libx264",
            audio_encoder="aac",
            copy_video=_H264,
            copy_audio=frozenset({"aac", "mp3"}),
            video_encoders=frozenset({"libx264", "flv1"}),
            audio_encoders=frozenset({"aac", "libmp3lame", "mp3"}),
            # FLV's audio header knows only mono and stereo
            max_audio_channels=2,
            content_type="video/x-flv",
        ),
        ContainerFormat(
            name="avi",
            muxer="avi",
            extension="avi",
            # classic AVI (Xvid/DivX + MP3) is what legacy players and editors expect
            video_encoder="mpeg4",
            audio_encoder="libmp3lame",
            copy_video={"mpeg4": EIGHT_BIT_420},
            copy_audio=frozenset({"mp3", "ac3", "pcm_s16le"}),
            video_encoders=frozenset({"mpeg4", "libx264"}),
            audio_encoders=frozenset({"libmp3lame", "mp3", "pcm_s16le"}),
            max_audio_channels=2,
            content_type="video/x-msvideo",
            needs_constant_frame_rate=True,
            video_tags={"mpeg4": "XVID"},
        ),
        ContainerFormat(
            name="m3u8",
            muxer="hls",
            extension="m3u8",
            video_encoder="libx264",
            audio_encoder="aac",
            # Apple's HLS authoring spec allows HEVC only in fMP4 segments, not MPEG-TS
            copy_video=_H264,
            copy_audio=frozenset({"aac", "mp3"}),
            video_encoders=frozenset({"libx264"}),
            audio_encoders=frozenset({"aac", "libmp3lame", "mp3"}),
            max_audio_channels=2,
            content_type="application/vnd.apple.mpegurl",
            segment_content_type="video/mp2t",
        ),
        ContainerFormat(
            name="webm",
            muxer="webm",
            extension="webm",
            video_encoder="libvpx-vp9",
            audio_encoder="libopus",
            copy_video={"vp8": frozenset(), "vp9": frozenset(), "av1": frozenset()},
            copy_audio=frozenset({"opus", "vorbis"}),
            video_encoders=frozenset({"libvpx-vp9"}),
            audio_encoders=frozenset({"libopus", "opus"}),
            max_audio_channels=2,
            content_type="video/webm",
        ),
    )
}


def get_format(name: str) -> ContainerFormat:
    """The format called `name` (case-insensitive); KeyError for an unknown one."""
    return FORMAT_TABLE[name.strip().lower().lstrip(".")]


def content_type_for(file_name: str) -> str:
    """The content type to upload an output file with, chosen by its extension."""
    extension = file_name.rsplit(".", 1)[-1].lower()
    if extension == "ts":
        return "video/mp2t"
    for fmt in FORMAT_TABLE.values():
        if fmt.extension == extension:
            return fmt.content_type
    return "application/octet-stream"


def accepts_video_copy(fmt: ContainerFormat, codec: str, pix_fmt: str | None) -> bool:
    """Whether a source video stream of this codec and pixel format may be copied into `fmt`.

    An empty pixel-format set means "any" (the codec itself defines what players support).
    """
    allowed = fmt.copy_video.get(codec)
    if allowed is None:
        return False
    return not allowed or (pix_fmt or "") in allowed
