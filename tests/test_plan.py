"""The planner, table-driven: source descriptions x formats → copy/encode and arguments."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from transcoder.errors import RequestError, SourceTooLargeError, UnsupportedMediaError
from transcoder.formats import FORMAT_TABLE, content_type_for
from transcoder.models import FORMATS, EncodingOptions
from transcoder.plan import OutputPlan, build_plan
from transcoder.probe import (
    SAFE_DEMUXERS,
    MediaInfo,
    StreamInfo,
    check_limits,
    parse_probe_output,
)
from transcoder.settings import Settings

OUT = Path("/out")
TEMP = Path("/out/.clip.part-x")


def video(codec: str = "h264", pix_fmt: str = "yuv420p", **kwargs: object) -> StreamInfo:
    values: dict = dict(
        index=0, width=1280, height=720, frame_rate="30/1", base_frame_rate="30/1", default=True
    )
    values.update(kwargs)
    return StreamInfo(kind="video", codec=codec, pix_fmt=pix_fmt, **values)


def audio(codec: str = "aac", channels: int = 2, index: int = 1) -> StreamInfo:
    return StreamInfo(index=index, kind="audio", codec=codec, channels=channels, sample_rate=48000)


def media(*streams: StreamInfo) -> MediaInfo:
    return MediaInfo(Path("/in/clip.mp4"), "mov,mp4", 10.0, 1000, tuple(streams))


def plan(source: MediaInfo, formats=FORMATS, settings: Settings | None = None, **options: Any):
    return build_plan(
        source,
        formats,
        EncodingOptions(**options),
        settings or Settings(),
        temp_dir=TEMP,
        out_dir=OUT,
        stem="clip",
    )


def modes(source: MediaInfo, **options: Any) -> dict[str, str]:
    """format -> video mode + audio mode, e.g. "copy/encode", "-/copy" for no video."""
    return {o.format: f"{o.video or '-'}/{o.audio or '-'}" for o in plan(source, **options).outputs}


def value_after(output: OutputPlan, flag: str) -> str:
    return output.args[output.args.index(flag) + 1]


C, E = "copy", "encode"
CC, CE, EC, EE = f"{C}/{C}", f"{C}/{E}", f"{E}/{C}", f"{E}/{E}"

# source → expected modes for mov, flv, avi, m3u8, mp4, webm
CASES = {
    "h264 aac": (media(video(), audio()), [CC, CC, EE, CC, CC, EE]),
    "hevc aac": (media(video("hevc"), audio()), [CC, EC, EE, EC, CC, EE]),
    "hevc 10-bit": (media(video("hevc", "yuv420p10le"), audio()), [CC, EC, EE, EC, CC, EE]),
    "h264 10-bit": (media(video("h264", "yuv420p10le"), audio()), [EC, EC, EE, EC, EC, EE]),
    "h264 4:2:2": (media(video("h264", "yuv422p"), audio()), [EC, EC, EE, EC, EC, EE]),
    "h264 full range": (media(video("h264", "yuvj420p"), audio()), [CC, CC, EE, CC, CC, EE]),
    "rotated h264": (media(video(rotation=90), audio()), [CC, EC, EE, EC, CC, EE]),
    "vfr h264": (media(video(variable_frame_rate=True), audio()), [CC, CC, EE, CC, CC, EE]),
    # HLS sums packet durations into #EXTINF: reordered VFR is re-timed (encoded at a CFR)
    "vfr h264 b-frames": (
        media(video(variable_frame_rate=True, has_b_frames=True), audio()),
        [CC, CC, EE, EC, CC, EE],
    ),
    "mpeg4 mp3": (media(video("mpeg4"), audio("mp3")), [CC, EC, CC, EC, CC, EE]),
    "mpeg4 b-frames": (
        media(video("mpeg4", has_b_frames=True), audio("mp3")),
        [CC, EC, EC, EC, CC, EE],
    ),
    "vp9 opus": (media(video("vp9"), audio("opus")), [EE, EE, EE, EE, EE, CC]),
    "prores pcm": (
        media(video("prores", "yuv422p10le"), audio("pcm_s16le")),
        [CC, EE, EC, EE, EE, EE],
    ),
    "5.1 aac": (media(video(), audio(channels=6)), [CC, CE, EE, CE, CC, EE]),
    "video only": (
        media(video()),
        ["copy/-", "copy/-", "encode/-", "copy/-", "copy/-", "encode/-"],
    ),
    "audio only aac": (
        media(audio(index=0)),
        ["-/copy", "-/copy", "-/encode", "-/copy", "-/copy", "-/encode"],
    ),
    "mp3 with cover": (
        media(audio("mp3", index=0), video("mjpeg", "yuvj420p", attached_pic=True, default=False)),
        ["-/copy", "-/copy", "-/copy", "-/copy", "-/copy", "-/encode"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_copy_or_encode_per_source_and_format(case: str) -> None:
    source, expected = CASES[case]
    assert list(modes(source).values()) == expected
    assert list(modes(source).keys()) == list(FORMATS)


def test_never_policy_encodes_everything() -> None:
    assert set(modes(media(video(), audio()), copy_policy="never").values()) == {EE}


@pytest.mark.parametrize(
    ("options", "expected_mov"),
    [
        ({"crf": 20}, EC),
        ({"video_bitrate": "1M"}, EC),
        ({"audio_bitrate": "96k"}, CE),
        ({"height": 480}, EC),  # 720 → 480: scaling means encoding
        ({"height": 1080}, CC),  # never upscaled, so the source fits as is
        ({"video_codec": "libx264"}, CC),  # already h264
        ({"video_codec": "libx265"}, EC),
        ({"audio_codec": "libmp3lame"}, CE),
    ],
)
def test_options_that_change_a_stream_force_encoding(options: dict, expected_mov: str) -> None:
    assert modes(media(video(), audio()), formats=["mov"], **options)["mov"] == expected_mov


def test_streams_are_mapped_explicitly_and_extras_dropped() -> None:
    subtitle = StreamInfo(index=2, kind="subtitle", codec="subrip")
    data = StreamInfo(index=3, kind="data", codec="bin_data")
    cover = video("mjpeg", attached_pic=True, index=4, default=False)
    result = plan(media(video(), audio(), subtitle, data, cover), formats=["mov"])
    (output,) = result.outputs
    maps = [output.args[i + 1] for i, arg in enumerate(output.args) if arg == "-map"]
    assert maps == ["0:0", "0:1"]


def test_input_is_locked_to_the_local_file_and_safe_demuxers() -> None:
    command = plan(media(video(), audio()), formats=["mov"]).command
    assert command[command.index("-i") + 1] == "file:/in/clip.mp4"
    assert command[command.index("-protocol_whitelist") + 1] == "file"
    allowed = command[command.index("-format_whitelist") + 1].split(",")
    assert allowed == list(SAFE_DEMUXERS)
    for dangerous in ("hls", "concat", "lavfi", "tty", "dash", "sdp", "rtsp", "data", "svg_pipe"):
        assert dangerous not in allowed
    assert "-probesize" in command and "-analyzeduration" in command and "-max_pixels" in command
    assert command.index("-progress") < command.index("-i")
    assert "-nostdin" in command
    assert "-pattern_type" not in command  # ffmpeg refuses it for any demuxer but image2


def test_a_picture_read_with_image2_is_pinned_to_the_file_itself() -> None:
    """image2 would expand `%d` or `*` in a name into other files: only with pattern none."""
    picture = MediaInfo(Path("/in/a%d*.jpg"), "image2", 1.0, 1000, (video("mjpeg"),), still=True)
    command = plan(picture, formats=["mp4"]).command
    before_input = command[: command.index("-i")]
    assert before_input[before_input.index("-f") + 1] == "image2"
    assert before_input[before_input.index("-pattern_type") + 1] == "none"
    assert command[command.index("-i") + 1] == "file:/in/a%d*.jpg"


def test_a_still_picture_becomes_a_one_second_still_video_everywhere() -> None:
    cover = video("mjpeg", "yuvj420p", attached_pic=True, frame_rate=None, base_frame_rate=None)
    source = MediaInfo(Path("/in/cover.mp4"), "mov,mp4", 1.0, 1000, (cover,), still=True)
    result = plan(source, formats=["mov", "avi", "m3u8", "webm"])
    for output in result.outputs:
        assert (output.video, output.audio) == ("encode", None)
        assert value_after(output, "-vf").startswith("trim=end_frame=1,loop=loop=24:size=1,")
        assert value_after(output, "-r") == "25" and value_after(output, "-fps_mode") == "cfr"
        # a cover picture's disposition would make mov/mp4 store the video as cover art
        assert value_after(output, "-disposition:v") == "default"
    assert result.duration_s == 1.0


def test_outputs_go_to_temp_names_and_final_names_follow_the_stem() -> None:
    result = plan(media(video(), audio()))
    assert result.work_dir == TEMP  # ffmpeg runs there: outputs are named relatively
    for output in result.outputs:
        assert output.args[-1] == f"file:{output.temp_path.name}"
        assert output.temp_path.parent == TEMP
        assert output.final_path == OUT / f"clip.{FORMAT_TABLE[output.format].extension}"


def test_hls_is_vod_with_forced_keyframes_at_the_segment_length() -> None:
    (output,) = plan(
        media(video(), audio()), formats=["m3u8"], hls_segment_s=4, copy_policy="never"
    ).outputs
    assert value_after(output, "-f") == "hls"
    assert value_after(output, "-hls_playlist_type") == "vod"
    assert value_after(output, "-hls_time") == "4"
    assert value_after(output, "-force_key_frames") == "expr:gte(t,n_forced*4)"
    assert value_after(output, "-hls_segment_filename") == "./clip%03d.ts"


def test_hls_default_segment_length_comes_from_settings() -> None:
    (output,) = plan(
        media(video(), audio()), formats=["m3u8"], settings=Settings(hls_segment_s=5)
    ).outputs
    assert value_after(output, "-hls_time") == "5"


def test_segment_names_are_safe_for_uris_and_patterns() -> None:
    result = build_plan(
        media(video(), audio()),
        ["m3u8"],
        EncodingOptions(),
        Settings(),
        temp_dir=TEMP,
        out_dir=OUT,
        stem="my 100% clip",
    )
    (output,) = result.outputs
    assert value_after(output, "-hls_segment_filename") == "./my_100__clip%03d.ts"
    assert output.final_path == OUT / "my 100% clip.m3u8"


def test_odd_size_and_10_bit_are_made_even_and_8_bit_when_encoding() -> None:
    source = media(video("h264", "yuv420p10le", width=321, height=241), audio())
    (output,) = plan(source, formats=["flv"]).outputs
    assert value_after(output, "-vf") == "scale=trunc(iw/2)*2:trunc(ih/2)*2,format=yuv420p"


def test_height_scales_down_keeping_the_aspect_ratio() -> None:
    (output,) = plan(media(video(), audio()), formats=["mp4"], height=361).outputs
    assert value_after(output, "-vf") == "scale=-2:360,format=yuv420p"


def test_avi_gets_constant_frame_rate_and_no_b_frames() -> None:
    source = media(
        video(variable_frame_rate=True, base_frame_rate="90000/1", frame_rate="1347000/44939"),
        audio(),
    )
    (avi,) = plan(source, formats=["avi"]).outputs
    assert value_after(avi, "-c:v") == "mpeg4"
    assert value_after(avi, "-fps_mode") == "cfr"
    assert value_after(avi, "-r") == "29.974"  # the bogus base rate is not used
    (avi_h264,) = plan(source, formats=["avi"], video_codec="libx264").outputs
    assert value_after(avi_h264, "-bf") == "0"
    (mov,) = plan(source, formats=["mov"], copy_policy="never").outputs
    assert value_after(mov, "-fps_mode") == "vfr"


def test_avi_frame_rate_of_a_gif_like_source_is_its_average() -> None:
    source = media(video("gif", "bgra", base_frame_rate="100/1", frame_rate="10/1"))
    (avi,) = plan(source, formats=["avi"]).outputs
    assert value_after(avi, "-r") == "10/1"


def test_the_main_video_is_one_with_a_picture_size() -> None:
    broken = video("h264", width=None, height=None, index=0)
    good = video("h264", index=1, default=False)
    (output,) = plan(media(broken, good, audio(index=2)), formats=["mov"]).outputs
    maps = [output.args[i + 1] for i, arg in enumerate(output.args) if arg == "-map"]
    assert maps == ["0:1", "0:2"]


def test_too_many_channels_are_downmixed() -> None:
    outputs = {o.format: o for o in plan(media(video(), audio(channels=6))).outputs}
    assert "-ac" not in outputs["mov"].args
    assert value_after(outputs["flv"], "-ac") == "2"
    assert value_after(outputs["avi"], "-ac") == "2"


def test_default_encoders_per_format() -> None:
    outputs = {
        o.format: o
        for o in plan(
            media(video("vp8"), audio("vorbis")), formats=["mov", "flv", "avi", "m3u8", "webm"]
        ).outputs
    }
    codecs = {name: (value_after(o, "-c:v"), value_after(o, "-c:a")) for name, o in outputs.items()}
    assert codecs == {
        "mov": ("libx264", "aac"),
        "flv": ("libx264", "aac"),
        "avi": ("mpeg4", "libmp3lame"),
        "m3u8": ("libx264", "aac"),
        "webm": ("copy", "copy"),
    }


def test_hevc_copy_gets_the_apple_tag() -> None:
    (output,) = plan(media(video("hevc"), audio()), formats=["mp4"]).outputs
    assert value_after(output, "-tag:v") == "hvc1"


def test_a_codec_the_container_cannot_hold_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="video codec 'libx265' cannot be written to flv"):
        plan(media(video(), audio()), formats=["flv"], video_codec="libx265")
    with pytest.raises(RequestError, match="audio codec 'aac' cannot be written to webm"):
        plan(media(audio(index=0)), formats=["mov", "webm"], audio_codec="aac")
    # refused even where the source would have been copied: the answer must not depend on it
    with pytest.raises(RequestError, match="video codec 'libx265' cannot be written to flv"):
        plan(media(video("hevc")), formats=["mov", "flv"], video_codec="libx265")


def test_unknown_format_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="unsupported format"):
        plan(media(video(), audio()), formats=["mkv"])


def test_threads_setting_reaches_decoder_and_encoders() -> None:
    result = plan(media(video(), audio()), formats=["avi"], settings=Settings(ffmpeg_threads=3))
    assert result.command.count("-threads") == 2


def test_content_types_for_uploads() -> None:
    assert content_type_for("a.m3u8") == "application/vnd.apple.mpegurl"
    assert content_type_for("a001.ts") == "video/mp2t"
    assert content_type_for("a.mov") == "video/quicktime"
    assert content_type_for("a.flv") == "video/x-flv"
    assert content_type_for("a.avi") == "video/x-msvideo"
    assert content_type_for("a.webm") == "video/webm"
    assert content_type_for("a.mp4") == "video/mp4"


# --- probe: what ffprobe's JSON is taken to mean ---------------------------------------------


def _probed(fmt: dict, *streams: dict, size_bytes: int = 100_000, packets=()) -> MediaInfo:
    data = {"format": fmt, "streams": list(streams), "packets": list(packets)}
    return parse_probe_output(Path("/in/x.mp4"), data, size_bytes)


H264 = {"index": 0, "codec_type": "video", "codec_name": "h264", "width": 64, "height": 48}
AAC = {"index": 1, "codec_type": "audio", "codec_name": "aac", "channels": 2}
DAYS_49 = str(49 * 86400)


@pytest.mark.parametrize(
    ("fmt", "streams", "size_bytes", "expected", "claimed"),
    [
        ({"duration": "10.0"}, [H264, AAC], 100_000, 10.0, None),
        # the container header alone lies: its streams are believed
        ({"duration": DAYS_49}, [{**H264, "duration": "1.0"}, {**AAC, "duration": "1.2"}],
         100_000, 1.2, 49 * 86400.0),
        # every header lies, but 100 kB cannot hold 49 days of anything: unknown, not refused
        ({"duration": DAYS_49}, [{**H264, "duration": DAYS_49}], 100_000, 0.0, 49 * 86400.0),
        # a genuinely long, small file (8 kbit/s speech) is believed
        ({"duration": "180000"}, [AAC], 180_000_000, 180_000.0, None),
        # no container duration: the longest stream's
        ({}, [{**H264, "duration": "3.0"}, {**AAC, "duration": "4.0"}], 100_000, 4.0, None),
    ],
)  # fmt: skip
def test_a_duration_is_believed_only_when_the_data_backs_it(
    fmt: dict, streams: list, size_bytes: int, expected: float, claimed: float | None
) -> None:
    media = _probed(fmt, *streams, size_bytes=size_bytes)
    assert (media.duration_s, media.claimed_duration_s) == (expected, claimed)


def test_limits_name_the_setting_that_raises_them() -> None:
    small = Settings(max_pixels=64 * 47, max_duration_s=100)
    with pytest.raises(SourceTooLargeError, match=r"64x48 .*TRANSCODER_MAX_PIXELS"):
        check_limits(_probed({"duration": "1"}, H264), small)
    with pytest.raises(SourceTooLargeError, match=r"duration 180000 s .*TRANSCODER_MAX_DURATION"):
        check_limits(_probed({"duration": "180000"}, AAC, size_bytes=10**9), small)
    # an unbacked claim is no reason to refuse
    assert check_limits(_probed({"duration": DAYS_49}, AAC), Settings()).duration_s == 0.0


def test_nothing_but_a_cover_picture_is_a_still_and_a_cover_beside_audio_is_dropped() -> None:
    cover = {**H264, "codec_name": "mjpeg", "disposition": {"attached_pic": 1}}
    alone = _probed({}, cover)
    assert alone.still and alone.video is not None and alone.duration_s == 1.0
    with_audio = _probed({"duration": "3"}, cover, AAC)
    assert not with_audio.still and with_audio.video is None and with_audio.duration_s == 3.0
    assert _probed({"format_name": "png_pipe"}, H264).still
    with pytest.raises(UnsupportedMediaError, match=r"no audio or video .*only subtitle"):
        check_limits(_probed({}, {"index": 0, "codec_type": "subtitle", "codec_name": "srt"}),
                     Settings())  # fmt: skip


def test_video_hidden_by_an_edit_list_is_measured_from_the_first_packets() -> None:
    packets = [
        {"stream_index": 1, "pts_time": "-0.021", "flags": "KD"},  # AAC priming: ignored
        {"stream_index": 0, "pts_time": "-0.52", "flags": "KD"},
        {"stream_index": 0, "pts_time": "-0.36", "flags": "_D"},
        {"stream_index": 0, "pts_time": "0.0", "flags": "__"},
    ]
    assert _probed({}, H264, AAC, packets=packets).video_preroll_s == 0.52
    assert _probed({}, H264, AAC, packets=packets[:1]).video_preroll_s == 0.0
    trimmed = replace(media(video(), audio()), video_preroll_s=0.52)
    assert modes(trimmed)["m3u8"] == EE and modes(trimmed)["mov"] == CC


def test_telephone_rate_audio_is_resampled_only_where_no_edit_list_hides_the_priming() -> None:
    phone = StreamInfo(index=1, kind="audio", codec="pcm_mulaw", channels=1, sample_rate=8000)
    outputs = {o.format: o for o in plan(media(video(), phone)).outputs}
    for name in ("m3u8", "flv", "avi"):
        assert value_after(outputs[name], "-ar") == "48000", name
    assert "-ar" not in outputs["mov"].args and "-ar" not in outputs["mp4"].args
    assert "-ar" not in plan(media(video(), audio()), formats=["m3u8"]).outputs[0].args


def test_hls_holds_the_last_picture_while_the_audio_goes_on() -> None:
    late = replace(audio(), end_s=1.5)
    short = media(video(end_s=1.0), late)
    outputs = {o.format: o for o in plan(short, formats=["m3u8", "mp4"]).outputs}
    assert (outputs["m3u8"].video, outputs["mp4"].video) == ("encode", "copy")
    assert value_after(outputs["m3u8"], "-vf").startswith(
        "tpad=stop_mode=clone:stop_duration=0.500,"
    )
    # the usual few milliseconds of extra audio change nothing
    almost = media(video(end_s=1.0), replace(audio(), end_s=1.1))
    assert modes(almost, formats=["m3u8"]) == {"m3u8": CC}
