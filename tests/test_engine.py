"""The engine with real ffmpeg on generated media: outputs play, last as long as the source,
copy where it should, clean up on failure and cancellation, and never read other files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import generate_media, missing_service, wait_for

from transcoder.engine import ProgressEvent, transcode
from transcoder.errors import (
    CancelledError,
    MediaError,
    SourceTooLargeError,
    StalledError,
    UnsupportedMediaError,
)
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
    commands: list[list[str]] = []

    with pytest.raises(MediaError) as caught:
        transcode(
            source, out, stem=kind, formats=["mov", "flv", "m3u8"], on_command=commands.append
        )

    expected = {
        "empty": "empty file (0 bytes)",
        "text": "not a media file",
        "random": "not a media file",
        "truncated": "truncated or incomplete file",
        "cut_short": "truncated or incomplete file",
    }
    assert expected[kind] in str(caught.value)
    assert not out.exists() or list(out.iterdir()) == []
    # a source that fails only once ffmpeg runs still reports the command that failed
    assert len(commands) == (1 if kind == "cut_short" else 0)
    assert all(command[0] == "ffmpeg" for command in commands)


def test_too_many_pixels_is_refused(make_media, tmp_path: Path) -> None:
    source = make_media("big.mp4", duration_s=0.5)
    with pytest.raises(SourceTooLargeError, match=r"320x240 .* \(TRANSCODER_MAX_PIXELS\)"):
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


def ffmpeg(*args: str | Path) -> None:
    command = ["ffmpeg", "-nostdin", "-v", "error", "-y", *map(str, args)]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, timeout=60)


def frame_count(path: Path) -> int:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    return int(out.split()[0])  # (an HLS playlist lists its stream twice)


AV = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=1",
      "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=1"]  # fmt: skip


def _subtitles_and_two_audio_tracks(path: Path) -> None:
    subtitles = path.with_suffix(".srt")
    subtitles.write_text("1\n00:00:00,000 --> 00:00:00,800\nhello\n")
    ffmpeg(*AV, "-f", "lavfi", "-i", "sine=frequency=660:duration=1", "-i", subtitles,
           "-map", "0", "-map", "1", "-map", "2", "-map", "3", "-c:v", "libx264", "-preset",
           "ultrafast", "-c:a", "aac", "-c:s", "srt", path)  # fmt: skip


def _mpeg2_ts_with_data_stream(path: Path) -> None:
    data = path.with_suffix(".bin")
    data.write_bytes(bytes(range(256)) * 8)
    ffmpeg(*AV, "-f", "data", "-i", data, "-map", "0", "-map", "1", "-map", "2",
           "-c:v", "mpeg2video", "-c:a", "mp2", "-c:d", "copy", "-f", "mpegts", path)  # fmt: skip


#: real-world shapes (all decode cleanly in ffmpeg): name → ffmpeg arguments or a maker
REAL_WORLD: dict[str, Any] = {
    "subs_two_audio.mkv": _subtitles_and_two_audio_tracks,
    "mpeg2_data.ts": _mpeg2_ts_with_data_stream,
    # a camera's MJPEG + PCM AVI, under a name that looks like an option, protocol and pattern
    "-cam:01%d.avi": [*AV, "-c:v", "mjpeg", "-c:a", "pcm_s16le"],
    "prores.mov": [*AV, "-c:v", "prores_ks", "-c:a", "pcm_s16le"],
    # ffmpeg-made VFR with B-frames: each packet claims 1/30 s, the gaps are in the timestamps
    "vfr_bframes.mp4": ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=1",
                        "-vf", "select='lt(mod(n,7),4)'", "-fps_mode", "vfr", "-c:v", "libx264"],
    "vp9_alpha.webm": ["-f", "lavfi", "-i", "testsrc2=size=160x120:duration=1,format=yuva420p",
                       "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"],
    "anim.gif": ["-f", "lavfi", "-i", "testsrc2=size=80x60:rate=10:duration=1"],
    "h263_phone.3gp": ["-f", "lavfi", "-i", "testsrc2=size=176x144:rate=15:duration=1",
                       "-f", "lavfi", "-i", "sine=sample_rate=8000:duration=1",
                       "-c:v", "h263", "-c:a", "aac", "-ar", "8000", "-ac", "1"],
    "speech.flac": ["-f", "lavfi", "-i", "sine=duration=1"],
    # audio 0.5-1.5 s, video 0-1 s: HLS times segments by the video alone
    "late_audio.mp4": ["-f", "lavfi", "-i", "testsrc2=size=160x120:duration=1",
                       "-itsoffset", "0.5", "-f", "lavfi", "-i", "sine=duration=1",
                       "-c:v", "libx264", "-c:a", "aac"],
    # 8 kHz telephone audio: AAC's priming would add 0.13 s where no edit list hides it
    "telephone.wav": ["-f", "lavfi", "-i", "sine=sample_rate=8000:duration=1",
                      "-c:a", "pcm_mulaw"],
}  # fmt: skip


def make_source(path: Path, how: Any) -> Path:
    if callable(how):
        how(path)
    else:
        ffmpeg(*how, path)
    return path


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
def test_real_world_sources_become_clean_mp4_and_hls(
    name: str, tmp_path: Path, ffmpeg_available: None
) -> None:
    source = make_source(tmp_path / name, REAL_WORLD[name])
    assert decode_errors(source) == ""  # ffmpeg decodes it cleanly, so we must succeed
    out = tmp_path / "out"

    result = transcode(source, out, stem=source.stem, formats=["mp4", "m3u8"])

    expected_s = duration_s(source)
    for output in result.outputs:
        assert_plays_fully(output.paths[-1], expected_s)
    assert {p.name for p in out.iterdir()} == {p.name for o in result.outputs for p in o.paths}
    kinds = sorted(stream_kinds(result.outputs[0].paths[-1]))
    assert kinds == sorted({"video", "audio"} & {s.kind for s in result.media.streams})


def _png(path: Path) -> None:
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", path)


def _cover_only(path: Path) -> None:
    picture = path.with_name("picture.png")
    _png(picture)
    ffmpeg("-i", picture, "-c:v", "mjpeg", "-disposition:v", "attached_pic", path)


STILLS: dict[str, Any] = {
    "cover.png": _png,  # png_pipe
    # image2 (chosen by the name): must read this file only, never the sequence `%d` names
    "photo%d.jpg": ["-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1",
                    "-update", "1"],
    "cover_only.mp4": _cover_only,  # nothing but an attached picture
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(STILLS))
def test_a_single_picture_becomes_a_one_second_still_video(
    name: str, tmp_path: Path, ffmpeg_available: None
) -> None:
    source = make_source(tmp_path / name, STILLS[name])
    for decoy in ("photo0.jpg", "photo1.jpg"):  # what `photo%d.jpg` names: opening blocks
        os.mkfifo(tmp_path / decoy)
    events: list[ProgressEvent] = []

    result = transcode(
        source, tmp_path / "out", stem="still", formats=["mp4", "m3u8", "avi"],
        settings=settings(probe_timeout_s=5), on_progress=events.append,
    )  # fmt: skip

    assert result.media.still and result.media.duration_s == 1.0
    for output in result.outputs:
        assert (output.video, output.audio) == ("encode", None)
        assert_plays_fully(output.paths[-1], 1.0)
        assert stream_kinds(output.paths[-1]) == ["video"]
        assert picture_size(output.paths[-1]) == (64, 48)
    assert frame_count(tmp_path / "out" / "still.mp4") == 25
    assert events[-1].percent == 100


def test_a_header_claiming_49_days_does_not_stop_a_one_second_clip(
    make_media, tmp_path: Path
) -> None:
    from hostile_media import patch_durations  # rewrites mvhd, tkhd and mdhd; samples stay

    source = patch_durations(make_media("claims.mp4", duration_s=1.0), 49 * 86400)
    events: list[ProgressEvent] = []

    result = transcode(
        source, tmp_path / "out", stem="claims", formats=["mp4", "m3u8"],
        on_progress=events.append,
    )  # fmt: skip

    assert result.media.claimed_duration_s == pytest.approx(49 * 86400)
    assert result.media.duration_s == pytest.approx(1.0)  # what the streams say
    for output in result.outputs:
        assert_plays_fully(output.paths[-1], 1.0)
    percents = [event.percent for event in events]
    assert percents == sorted(percents) and percents[-1] == 100
    assert all(event.eta_s is None or event.eta_s < 60 for event in events)


def test_a_source_really_longer_than_the_limit_names_the_setting(
    make_media, tmp_path: Path
) -> None:
    source = make_media("long.mp4", duration_s=2.0)
    with pytest.raises(SourceTooLargeError, match=r"duration 2 s .*TRANSCODER_MAX_DURATION_S"):
        transcode(
            source, tmp_path / "out", stem="long", formats=["mp4"],
            settings=settings(max_duration_s=1.5),
        )  # fmt: skip


def test_a_clip_trimmed_without_re_encoding_keeps_its_cut_in_every_format(
    make_media, tmp_path: Path
) -> None:
    """`-ss 0.5 -c copy` leaves 0.5 s before the cut that an edit list hides: mov/mp4 copy
    it (their edit list hides it too), the others must not play it."""
    whole = make_media("whole.mp4", duration_s=2.0, extra_output_args=("-g", "50"))
    trimmed = tmp_path / "trimmed.mp4"
    ffmpeg("-ss", "0.5", "-i", whole, "-c", "copy", trimmed)
    expected_frames = frame_count(trimmed)

    result = transcode(trimmed, tmp_path / "out", stem="trimmed", formats=["mp4", "m3u8", "flv"])

    assert result.media.video_preroll_s == pytest.approx(0.5, abs=0.05)
    modes = {o.format: (o.video, o.audio) for o in result.outputs}
    assert modes == {
        "mp4": ("copy", "copy"),
        "m3u8": ("encode", "encode"),
        "flv": ("encode", "encode"),
    }
    for output in result.outputs:
        assert_plays_fully(output.paths[-1], 1.5)
        assert frame_count(output.paths[-1]) == expected_frames


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("WEBVTT\n\n00:00.000 --> 00:01.000\nhello\n", UnsupportedMediaError,
         "unsupported input format 'webvtt'"),
        ("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1,\nother.ts\n#EXT-X-ENDLIST\n", MediaError,
         "not a media file: a hls playlist or script that may reference other files"),
    ],
)  # fmt: skip
def test_a_refused_format_is_named(
    content: str, error: type[MediaError], message: str, tmp_path: Path, ffmpeg_available: None
) -> None:
    source = tmp_path / "refused.mp4"
    source.write_text(content)
    with pytest.raises(error) as caught:
        transcode(source, tmp_path / "out", stem="refused", formats=["mp4"])
    assert type(caught.value) is error
    assert message in str(caught.value)


def test_a_probe_that_hangs_is_stopped_and_may_be_retried(
    make_media, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen or starved ffprobe says nothing about the file: retryable, not "bad media"."""
    source = make_media("clip.mp4", duration_s=0.5)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hang = f'#!/bin/sh\nexec {sys.executable} -c "import time; time.sleep(30)" "$@"\n'
    (bin_dir / "ffprobe").write_text(hang)  # its command line still names the source
    (bin_dir / "ffprobe").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()

    with pytest.raises(StalledError, match=r"probing took longer than 0\.5 s") as caught:
        transcode(source, tmp_path / "out", stem="clip", formats=["mp4"],
                  settings=settings(probe_timeout_s=0.5))  # fmt: skip

    assert caught.value.retryable
    assert time.monotonic() - started < 3
    python = os.path.basename(sys.executable).encode()
    assert not ffmpeg_processes_using(str(source), (python,))  # the hung "ffprobe" is gone
