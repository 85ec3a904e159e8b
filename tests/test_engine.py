"""The engine with real ffmpeg on generated media: outputs play, last as long as the source,
copy where it should, clean up on failure and cancellation, and never read other files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import generate_media, missing_service, wait_for

from transcoder.engine import ProgressEvent, transcode
from transcoder.errors import CancelledError, MediaError, SourceTooLargeError
from transcoder.models import EncodingOptions
from transcoder.probe import input_args, probe
from transcoder.settings import Settings

pytestmark = pytest.mark.usefixtures("ffmpeg_available")
ALL_FORMATS = ["mov", "mp4", "flv", "avi", "m3u8", "webm"]


def settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]


def duration_s(path: Path) -> float:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
        capture_output=True,
        check=True,
    ).stdout
    return float(json.loads(out)["format"]["duration"])


def decode_errors(path: Path) -> str:
    """Every error line ffmpeg prints while decoding the whole file ('' = plays cleanly)."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    return result.stderr.strip() or ("" if result.returncode == 0 else f"exit {result.returncode}")


def stream_kinds(path: Path) -> list[str]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of", "json", str(path)],
        capture_output=True,
        check=True,
    ).stdout
    return [stream["codec_type"] for stream in json.loads(out)["streams"]]


def channels(path: Path) -> int:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries", "stream=channels",
         "-of", "json", str(path)],
        capture_output=True,
        check=True,
    ).stdout  # fmt: skip
    return int(json.loads(out)["streams"][0]["channels"])


def picture_size(path: Path) -> tuple[int, int]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", "stream=width,height",
         "-of", "json", str(path)],
        capture_output=True,
        check=True,
    ).stdout  # fmt: skip
    stream = json.loads(out)["streams"][0]
    return stream["width"], stream["height"]


def assert_plays_fully(path: Path, expected_s: float) -> None:
    assert decode_errors(path) == "", f"{path.name} does not decode cleanly"
    assert duration_s(path) == pytest.approx(expected_s, abs=0.1), path.name


def ffmpeg_processes_using(
    marker: str, tools: tuple[bytes, ...] = (b"ffmpeg", b"ffprobe")
) -> list[int]:
    """PIDs of live ffmpeg/ffprobe processes whose command line mentions `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" in status:
            continue
        if cmdline and cmdline[0].endswith(tools) and marker.encode() in b" ".join(cmdline):
            pids.append(int(entry.name))
    return pids


def test_every_format_plays_fully_with_copy_where_it_fits(make_media, tmp_path: Path) -> None:
    source = make_media("clip.mp4", duration_s=2.0)
    out = tmp_path / "out"
    events: list[ProgressEvent] = []

    result = transcode(source, out, stem="clip", formats=ALL_FORMATS, on_progress=events.append)

    modes = {o.format: (o.video, o.audio) for o in result.outputs}
    assert modes == {
        "mov": ("copy", "copy"),
        "mp4": ("copy", "copy"),
        "flv": ("copy", "copy"),
        "m3u8": ("copy", "copy"),
        "avi": ("encode", "encode"),
        "webm": ("encode", "encode"),
    }
    assert len(result.commands) == 1  # one ffmpeg for every format
    for output in result.outputs:
        main_file = output.paths[-1]
        assert main_file == out / f"clip.{output.format}"
        assert_plays_fully(main_file, 2.0)
    percents = [event.percent for event in events]
    assert percents == sorted(percents) and percents[-1] == 100
    assert all(0 <= p <= 100 for p in percents)
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == []  # no temporary directory left behind


def test_hls_is_a_complete_vod_playlist_with_relative_segments(make_media, tmp_path: Path) -> None:
    source = make_media("my clip.mp4", duration_s=3.0)
    out = tmp_path / "out %d: 100%"  # nothing in a path may act as a pattern or protocol
    options = EncodingOptions(hls_segment_s=1, copy_policy="never")

    result = transcode(source, out, stem="my 100% clip", formats=["m3u8"], options=options)

    (hls,) = result.outputs
    playlist = hls.paths[-1]
    assert playlist == out / "my 100% clip.m3u8"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in hls.paths)
    text = playlist.read_text()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text and text.rstrip().endswith("#EXT-X-ENDLIST")
    names = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(names) == 3  # keyframes forced every second → 1 s segments
    assert all("/" not in name and " " not in name for name in names)
    assert [p.name for p in hls.paths[:-1]] == names
    assert all((out / name).stat().st_size > 0 for name in names)
    assert_plays_fully(playlist, 3.0)


ODD_SOURCES = {
    "rotated": dict(),  # the rotation is added by a remux below
    "odd_size_444": dict(size="321x241", pix_fmt="yuv444p"),
    "hevc_10bit": dict(video_codec="libx265", pix_fmt="yuv420p10le"),
    "10bit_h264": dict(pix_fmt="yuv420p10le"),
    "yuv422_h264": dict(pix_fmt="yuv422p"),
    # 25 fps for half a second, then 10 fps
    "variable_rate": dict(
        extra_output_args=("-vf", "setpts='(N*0.04+gt(N,12)*(N-12)*0.06)/TB'", "-fps_mode", "vfr")
    ),
    "no_audio": dict(audio=False),
    "surround_audio": dict(
        extra_output_args=("-af", "pan=5.1|c0=c0|c1=c0|c2=c0|c3=c0|c4=c0|c5=c0")
    ),
}

#: video copy (c) or encode (e) for mov, flv, avi, m3u8
EXPECTED_VIDEO_MODES = {
    "rotated": "ceee",
    "odd_size_444": "eeee",
    "hevc_10bit": "ceee",
    "10bit_h264": "eeee",
    "yuv422_h264": "eeee",
    "variable_rate": "ccec",
    "no_audio": "ccec",
    "surround_audio": "ccec",
}


@pytest.mark.parametrize("case", sorted(ODD_SOURCES))
def test_odd_sources_give_clean_outputs(case: str, tmp_path: Path, ffmpeg_available) -> None:
    source = generate_media(tmp_path / f"{case}.mp4", duration_s=1.0, **ODD_SOURCES[case])  # type: ignore[arg-type]
    if case == "rotated":
        plain, source = source, tmp_path / "rotated_tagged.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-i",
                str(plain),
                "-c",
                "copy",
                "-metadata:s:v:0",
                "rotate=90",
                str(source),
            ],
            check=True,
        )
    media = probe(source, Settings())
    assert media.video is None or media.video.rotation == (90 if case == "rotated" else 0)
    assert media.video is None or media.video.variable_frame_rate == (case == "variable_rate")

    result = transcode(source, tmp_path / "out", stem=case, formats=["mov", "flv", "avi", "m3u8"])

    for output in result.outputs:
        assert_plays_fully(output.paths[-1], duration_s(source))
    if case == "no_audio":
        assert {o.audio for o in result.outputs} == {None}
        assert all(stream_kinds(o.paths[-1]) == ["video"] for o in result.outputs)
    modes = "".join(o.video[0] if o.video else "-" for o in result.outputs)
    assert modes == EXPECTED_VIDEO_MODES[case]  # for mov, flv, avi, m3u8
    if case == "surround_audio":
        assert [o.audio for o in result.outputs] == ["copy", "encode", "encode", "encode"]
        assert all(channels(o.paths[-1]) == 2 for o in result.outputs if o.format != "mov")
    if case == "rotated":  # flv, avi and HLS cannot say "turn this": the pixels were turned
        flv = next(o.paths[-1] for o in result.outputs if o.format == "flv")
        assert picture_size(flv) == (240, 320)


def test_audio_only_source_gives_audio_only_outputs(make_media, tmp_path: Path) -> None:
    source = make_media("song.m4a", duration_s=2.0, video=False)

    result = transcode(source, tmp_path / "out", stem="song", formats=["mov", "flv", "avi", "m3u8"])

    for output in result.outputs:
        assert output.video is None
        assert stream_kinds(output.paths[-1]) == ["audio"]
        assert duration_s(output.paths[-1]) == pytest.approx(2.0, abs=0.15)
        assert decode_errors(output.paths[-1]) == ""


def test_cover_picture_and_subtitles_are_not_carried_over(make_media, tmp_path: Path) -> None:
    clip = make_media("clip.mp4", duration_s=1.0)
    cover = tmp_path / "cover.png"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "color=red:size=64x64",
            "-frames:v",
            "1",
            str(cover),
        ],
        check=True,
    )
    song = make_media("song.mp3", duration_s=1.0, video=False, audio_codec="libmp3lame")
    tagged = tmp_path / "tagged.mp3"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(song), "-i", str(cover), "-map", "0", "-map", "1",
         "-c", "copy", "-disposition:v", "attached_pic", str(tagged)],
        check=True,
    )  # fmt: skip
    subtitles = tmp_path / "subs.srt"
    subtitles.write_text("1\n00:00:00,000 --> 00:00:00,500\nhello\n")
    with_subs = tmp_path / "subs.mkv"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(clip), "-i", str(subtitles), "-map", "0", "-map", "1",
         "-c", "copy", str(with_subs)],
        check=True,
    )  # fmt: skip

    song_result = transcode(tagged, tmp_path / "a", stem="tagged", formats=["mov", "flv"])
    subs_result = transcode(with_subs, tmp_path / "b", stem="subs", formats=["mov", "m3u8"])

    assert all(stream_kinds(o.paths[-1]) == ["audio"] for o in song_result.outputs)
    for output in subs_result.outputs:
        assert sorted(stream_kinds(output.paths[-1])) == ["audio", "video"]
        assert_plays_fully(output.paths[-1], 1.0)


@pytest.mark.parametrize("kind", ["empty", "text", "random", "truncated", "cut_short"])
def test_bad_sources_are_classified_and_leave_nothing(
    kind: str, make_media, tmp_path: Path
) -> None:
    source = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        source.touch()
    elif kind == "text":
        source.write_text("this is not a video\n" * 50)
    elif kind == "random":
        source.write_bytes(os.urandom(100_000))
    elif kind == "truncated":
        whole = make_media("whole.mp4", duration_s=2.0).read_bytes()  # moov at the end
        source.write_bytes(whole[: len(whole) // 2])
    else:  # moov first: probing works, the data just ends early
        args = ("-movflags", "+faststart")
        whole = make_media("whole.mp4", duration_s=2.0, extra_output_args=args).read_bytes()
        source.write_bytes(whole[: len(whole) * 6 // 10])
    out = tmp_path / "out"

    with pytest.raises(MediaError) as caught:
        transcode(source, out, stem=kind, formats=["mov", "flv", "m3u8"])

    expected = {
        "empty": "empty file (0 bytes)",
        "text": "not a media file",
        "random": "not a media file",
        "truncated": "truncated or incomplete file",
        "cut_short": "truncated or incomplete file",
    }
    assert expected[kind] in str(caught.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_too_many_pixels_is_refused(make_media, tmp_path: Path) -> None:
    source = make_media("big.mp4", duration_s=0.5)
    with pytest.raises(SourceTooLargeError, match="320x240"):
        transcode(
            source,
            tmp_path / "out",
            stem="big",
            formats=["mov"],
            settings=settings(max_pixels=320 * 200),
        )


def _hostile_sources(tmp_path: Path, secret: Path) -> dict[str, Path]:
    playlist = tmp_path / "playlist.mp4"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1,\n{secret}\n#EXT-X-ENDLIST\n"
    )
    remote = tmp_path / "remote.mp4"
    remote.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n"
    )
    concat = tmp_path / "concat.mp4"
    concat.write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    return {"playlist": playlist, "remote": remote, "concat": concat}


def test_disguised_playlists_never_open_the_file_they_name(make_media, tmp_path: Path) -> None:
    """A named FIFO blocks whoever opens it: a quick, clean error proves nobody did."""
    secret = tmp_path / "secret.ts"
    os.mkfifo(secret)
    for name, source in _hostile_sources(tmp_path, secret).items():
        started = time.monotonic()
        with pytest.raises(MediaError, match="not a media file"):
            transcode(
                source,
                tmp_path / name,
                stem=name,
                formats=["mov"],
                settings=settings(probe_timeout_s=5),
            )
        assert time.monotonic() - started < 4, name
        # and ffmpeg itself, given our input options, refuses it as well
        ffmpeg = subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", *input_args(source), "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        assert ffmpeg.returncode != 0 and "not on whitelist" in ffmpeg.stderr


def test_disguised_playlists_under_strace(make_media, tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        missing_service("strace is not installed")
    secret = make_media("secret.ts", duration_s=0.5)
    for name, source in _hostile_sources(tmp_path, secret).items():
        for tool in ("ffprobe", "ffmpeg"):
            trace = tmp_path / f"{name}.{tool}.trace"
            subprocess.run(
                ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=open,openat,connect",
                 tool, "-nostdin" if tool == "ffmpeg" else "-hide_banner", "-v", "error",
                 *input_args(source), *(["-f", "null", "-"] if tool == "ffmpeg" else [])],
                capture_output=True,
                timeout=20,
            )  # fmt: skip
            calls = trace.read_text()
            assert str(source) in calls  # the trace works
            assert "secret.ts" not in calls, f"{tool} opened the file named by {name}"
            assert "connect(" not in calls, f"{tool} connected somewhere for {name}"


def test_cancel_kills_ffmpeg_fast_and_leaves_nothing(tmp_path: Path, ffmpeg_available) -> None:
    source = generate_media(tmp_path / "long.mp4", duration_s=6.0, size="640x360")
    out = tmp_path / "out"
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def on_progress(event: ProgressEvent) -> None:
        if event.out_time_s > 0 and not cancel.is_set():
            assert ffmpeg_processes_using(str(source))  # it is running now
            cancelled_at.append(time.monotonic())
            cancel.set()

    with pytest.raises(CancelledError):
        transcode(
            source,
            out,
            stem="long",
            formats=["webm", "avi", "mov"],
            options=EncodingOptions(copy_policy="never"),
            settings=settings(ffmpeg_threads=1),
            on_progress=on_progress,
            cancel=cancel,
        )

    assert cancelled_at, "ffmpeg finished before it could be cancelled"
    wait_for(lambda: not ffmpeg_processes_using(str(source)), 2.0, "ffmpeg to exit")
    assert time.monotonic() - cancelled_at[0] < 2.0
    assert list(out.iterdir()) == []
