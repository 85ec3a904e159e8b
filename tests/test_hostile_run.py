"""The hostile and odd corpus through `transcoder run --to mp4,m3u8`, as a user runs it,
and through a real worker.

Every source ends, within 120 s, in outputs that decode, or in exit 1 with one line naming a
classified error; either way no traceback, no temp file (out dir, work dir, TMPDIR), no
ffmpeg left behind. Every run is traced (`strace -f`): no process of the run may open a file
a disguised playlist names or connect anywhere, and a listening loopback socket that the
URL playlists name never sees a connection.

Through the worker (traced too): one record, one delivery (success or dead letter), no retry
of a permanent error, nothing in the bucket for a failure, and the next job still succeeds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import S3Server, generate_media, missing_service, start_moto, wait_for
from hostile_media import CASES, CLIP_S, CORPUS, HostileCase, build_corpus, decodes_cleanly
from test_faults import RedisServer, dlq_envelopes, object_names, settings_for, wait_finished
from workers import FAST_ENV, Worker, ffmpeg_processes

from transcoder import errors, keys, service
from transcoder.models import JobRecord, JobState
from transcoder.settings import Settings

pytestmark = pytest.mark.usefixtures("ffmpeg_available")

RUN_TIMEOUT_S = 120
#: every error type the project can report, from its own hierarchy
CLASSIFIED = {
    cls.error_type
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.TranscoderError)
}
_CONSOLE_SCRIPT = Path(sys.executable).parent / "transcoder"
CLI = (
    [str(_CONSOLE_SCRIPT)]
    if _CONSOLE_SCRIPT.exists()
    else [sys.executable, "-c", "from transcoder.cli import main; main()"]
)


@dataclass
class Corpus:
    directory: Path
    paths: dict[str, Path]
    listener: socket.socket

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def listener_connections(self) -> int:
        """How many connections reached the listening socket (accepted and closed here)."""
        count = 0
        while True:
            try:
                connection, _ = self.listener.accept()
            except BlockingIOError:
                return count
            connection.close()
            count += 1


@pytest.fixture(scope="module")
def corpus(ffmpeg_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    directory = tmp_path_factory.mktemp("corpus")
    paths = build_corpus(directory, int(listener.getsockname()[1]))
    yield Corpus(directory, paths, listener)
    listener.close()


@dataclass
class Run:
    result: subprocess.CompletedProcess[str]
    out: Path
    work: Path
    temp: Path
    trace: str


def run_traced(
    source: Path,
    root: Path,
    command: list[str] | None = None,
    timeout_s: float = RUN_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
) -> Run:
    """`transcoder run SOURCE --to mp4,m3u8 --out root/out` (or `command`) under strace,
    in its own session, with TRANSCODER_WORK_DIR and TMPDIR inside `root`."""
    if shutil.which("strace") is None:
        missing_service("strace is not installed (apt-get install strace)")
    out, work, temp = root / "out", root / "work", root / "tmp"
    work.mkdir(parents=True)
    temp.mkdir()
    trace_path = root / "trace.txt"
    traced = [
        "strace",
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-e",
        "trace=open,openat,openat2,connect",
        "-o",
        str(trace_path),
        *(command or [*CLI, "run", str(source), "--to", "mp4,m3u8", "--out", str(out)]),
    ]
    env = {
        **os.environ,
        "TRANSCODER_WORK_DIR": str(work),
        "TMPDIR": str(temp),
        "COLUMNS": "200",
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        traced,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        if command is None:
            pytest.fail(f"transcoder run {source.name} took longer than {timeout_s} s")
    result = subprocess.CompletedProcess(traced, process.returncode, stdout, stderr)
    trace = trace_path.read_text(errors="replace") if trace_path.exists() else ""
    return Run(result, out, work, temp, trace)


def decode_errors(path: Path) -> tuple[int, str]:
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return result.returncode, result.stderr.strip()


def duration_s(path: Path) -> float:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return float(result.stdout.strip() or "nan")


def playlist_segments(playlist: Path) -> list[str]:
    lines = playlist.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


# --- the corpus keeps its own rule ----------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CORPUS if not c.hostile], ids=lambda c: c.name)
def test_the_corpus_expectations_follow_ffmpegs_own_verdict(
    corpus: Corpus, case: HostileCase
) -> None:
    """A file ffmpeg decodes cleanly must be "ok" (unless it exceeds a documented limit)."""
    clean = decodes_cleanly(corpus.paths[case.name])
    if case.over_limit:
        assert clean, f"{case.name} should be real media, refused only for its size"
        assert case.expect == "fail"
    elif clean:
        assert case.expect == "ok"
    else:
        assert case.expect in ("fail", "either")


@pytest.mark.parametrize("name", ["hls_local_ts_relative", "hls_loopback_url"])
def test_the_trace_catches_a_playlist_that_plain_ffmpeg_follows(
    corpus: Corpus, name: str, tmp_path: Path
) -> None:
    """The checks below can fail: unguarded ffmpeg does open the decoy / call the listener.

    (ffmpeg's hls demuxer limits a local playlist to local protocols on its own, so the URL
    case widens the whitelist to show what the trace and the listener would record.)"""
    source = corpus.paths[name]
    widen = ["-protocol_whitelist", "file,http,tcp", "-rw_timeout", "1000000"]
    plain = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        *(widen if CASES[name].names_listener else []),
        "-i",
        str(source),
        "-f",
        "null",
        "-",
    ]

    run = run_traced(source, tmp_path, plain, timeout_s=5)

    if CASES[name].names_listener:
        assert f"htons({corpus.port})" in run.trace
        assert corpus.listener_connections() >= 1
    else:
        assert "decoys/secret.ts" in run.trace


# --- every case through `transcoder run` ----------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_transcoder_run_ends_cleanly(corpus: Corpus, case: HostileCase, tmp_path: Path) -> None:
    source = corpus.paths[case.name]

    run = run_traced(source, tmp_path)

    result = run.result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode in (0, 1), result.stderr
    if result.returncode == 0:
        assert case.expect in ("ok", "either"), f"{case.name} should have failed: {result.stdout}"
        _assert_valid_outputs(case, source, run.out)
    else:
        assert case.expect in ("fail", "either"), f"{case.name} should succeed: {result.stderr}"
        reasons = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(reasons) == 1, result.stderr
        match = re.fullmatch(rf"error: {re.escape(source.name)}: (\w+): (.+)", reasons[0])
        assert match, reasons[0]
        accepted = case.errors if case.expect == "fail" else CLASSIFIED
        assert match.group(1) in accepted, reasons[0]
        assert not run.out.exists() or not any(run.out.iterdir()), "partial output left"

    # nothing left behind, whatever the outcome
    assert list(run.work.iterdir()) == [], "temp files left in TRANSCODER_WORK_DIR"
    assert list(run.temp.iterdir()) == [], "temp files left in TMPDIR"
    assert ffmpeg_processes(corpus.directory) == []
    assert ffmpeg_processes(tmp_path) == []

    # no process of the run opened a file the source names, or connected anywhere
    assert source.name in run.trace or source.stat().st_size == 0, "strace saw nothing"
    for name in case.names_files:
        assert str(corpus.directory / name) not in run.trace, f"{name} was opened"
        assert name not in run.trace, f"{name} was opened"
    connects = [line for line in run.trace.splitlines() if "connect(" in line]
    internet = [line for line in connects if "AF_INET" in line]
    assert internet == [], f"network connections attempted: {internet}"
    assert f"htons({corpus.port})" not in run.trace
    assert corpus.listener_connections() == 0


def _assert_valid_outputs(case: HostileCase, source: Path, out: Path) -> None:
    stem = source.stem
    mp4, playlist = out / f"{stem}.mp4", out / f"{stem}.m3u8"
    assert mp4.is_file() and playlist.is_file()
    segments = playlist_segments(playlist)
    assert segments, "an HLS playlist without segments"
    assert "#EXT-X-ENDLIST" in playlist.read_text()
    # the out dir holds the outputs and nothing else: no temp dir, no stray file
    expected = {mp4.name, playlist.name, *segments}
    assert {p.name for p in out.iterdir()} == expected
    for path in (mp4, playlist):
        returncode, stderr = decode_errors(path)
        assert returncode == 0, stderr
        if case.expect == "ok":  # an "either" source may carry its own damage along
            assert stderr == "", f"{path.name}: {stderr}"
        if case.expect == "ok" and case.duration_s is not None:
            assert abs(duration_s(path) - case.duration_s) < 0.15, path.name
        else:
            assert 0 < duration_s(path) <= 2 * CLIP_S + 0.2, path.name


def test_a_failure_is_exactly_one_line_on_stderr(corpus: Corpus, tmp_path: Path) -> None:
    """What a script reading stderr sees: the reason, and nothing else (no progress bar)."""
    source = corpus.paths[CASES["text"].name]

    run = run_traced(source, tmp_path)

    assert run.result.returncode == 1
    lines = [line for line in run.result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {source.name}: MediaError: not a media file (invalid data)"]


@pytest.mark.parametrize(
    ("limit", "value", "message"),
    [
        ("TRANSCODER_MAX_SOURCE_BYTES", "10000", "exceeds the limit of 10000 bytes"),
        ("TRANSCODER_MAX_PIXELS", "10000", "exceeds the limit of 10000 pixels"),
    ],
)
def test_a_configured_limit_refuses_the_source_in_one_line(
    corpus: Corpus, limit: str, value: str, message: str, tmp_path: Path
) -> None:
    source = corpus.paths["rotated_90"]  # 160x120 (19200 px), about 48 KB

    run = run_traced(source, tmp_path, extra_env={limit: value})

    assert run.result.returncode == 1
    reasons = [line for line in run.result.stderr.splitlines() if line.startswith("error:")]
    assert len(reasons) == 1 and "SourceTooLargeError" in reasons[0], run.result.stderr
    assert message in reasons[0]
    assert not run.out.exists() or not any(run.out.iterdir())
    assert list(run.work.iterdir()) == [] and list(run.temp.iterdir()) == []


# --- the same corpus through the worker -----------------------------------------------------


@dataclass
class WorkerRun:
    settings: Settings
    moto: S3Server
    work: Path
    trace: str
    records: dict[str, JobRecord]
    after: JobRecord


def _session_pids(leader: int) -> list[int]:
    """Every process in the worker's session (its main process and the pool children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == leader:  # field 6 of stat: the session id
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def worker_run(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerRun]:
    """Every case as a job on one traced worker, then one ordinary job after them."""
    if shutil.which("strace") is None:
        missing_service("strace is not installed (apt-get install strace)")
    root = tmp_path_factory.mktemp("hostile-worker")
    redis_server = RedisServer(root / "redis").start()
    moto = start_moto()
    work = root / "work"
    work.mkdir()
    env = {
        **moto.env(),
        **FAST_ENV,
        "TRANSCODER_REDIS_URL": redis_server.url(),
        "TRANSCODER_WORK_DIR": str(work),
        "TRANSCODER_ON_SUCCESS": "redis-list:hostile:success",
    }
    settings = settings_for(env)
    worker = Worker("hostile", env, root, concurrency=2).start()
    tracer: subprocess.Popen[bytes] | None = None
    try:
        client = moto.client()
        client.make_bucket("hostile")
        for case in CORPUS:
            path = corpus.paths[case.name]
            client.fput_object("hostile", f"in/{path.name}", str(path))
        ordinary = corpus.directory / "ordinary.mp4"
        generate_media(ordinary, duration_s=1, size="160x120")
        client.fput_object("hostile", "in/ordinary.mp4", str(ordinary))
        worker.wait_ready()
        assert worker.process is not None
        trace_path = root / "trace.txt"
        pids = [arg for pid in _session_pids(worker.process.pid) for arg in ("-p", str(pid))]
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2,connect", "-o",
             str(trace_path), *pids],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: trace_path.exists(), 10, "strace to attach")
        for case in CORPUS:
            service.submit(
                {
                    "bucket": "hostile",
                    "object": f"in/{corpus.paths[case.name].name}",
                    "output_dir": f"out/{case.name}",
                    "dst_formats": ["mp4", "m3u8"],
                    "invocation_id": f"hostile_{case.name}",
                },
                settings=settings,
            )
        records = {
            case.name: wait_finished(settings, f"hostile_{case.name}", timeout_s=120)
            for case in CORPUS
        }
        # the worker is not wedged: an ordinary job after the corpus succeeds
        request = {"bucket": "hostile", "object": "in/ordinary.mp4", "dst_format": "mp4",
                   "output_dir": "out/ordinary", "invocation_id": "after_the_corpus"}  # fmt: skip
        service.submit(request, settings=settings)
        after = wait_finished(settings, "after_the_corpus", timeout_s=60)
        store = service.get_store(settings)

        def undelivered() -> list[str]:
            delivered = {
                json.loads(raw)["requestContext"]["requestId"]
                for key in ("hostile:success", keys.DLQ)
                for raw in store.client.lrange(key, 0, -1)
            }
            return [record.id for record in records.values() if record.id not in delivered]

        # a dead letter travels through the dest_fail task: it lands a moment after the state
        try:
            wait_for(lambda: not undelivered(), 20, "a delivery for every job", interval_s=0.1)
        except AssertionError:
            pytest.fail(f"no envelope at all for {undelivered()}")
        tracer.terminate()
        tracer.wait(10)
        trace = trace_path.read_text(errors="replace")
        yield WorkerRun(settings, moto, work, trace, records, after)
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
        worker.stop()
        moto.process.terminate()
        moto.process.wait(10)
        redis_server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_the_worker_ends_each_case_with_one_record_and_one_delivery(
    worker_run: WorkerRun, corpus: Corpus, case: HostileCase
) -> None:
    final = worker_run.records[case.name]
    settings = worker_run.settings
    job_id = final.id
    client = service.get_store(settings).client
    successes = [
        body for raw in client.lrange("hostile:success", 0, -1)
        if (body := json.loads(raw))["requestContext"]["requestId"] == job_id
    ]  # fmt: skip
    dead = dlq_envelopes(settings, job_id)
    outputs = object_names(worker_run.moto, "hostile", f"out/{case.name}/")

    assert final.attempts == 1, f"retried: {final.error}"  # nothing here is transient
    if final.state == JobState.SUCCEEDED:
        assert case.expect in ("ok", "either"), f"{case.name} should have failed"
        assert len(successes) == 1 and dead == []
        assert outputs == sorted(output.key for output in final.outputs)
        assert f"out/{case.name}/{corpus.paths[case.name].stem}.m3u8" in outputs
    else:
        assert case.expect in ("fail", "either"), f"{case.name} should succeed: {final.error}"
        assert final.state == JobState.FAILED and final.error is not None
        accepted = case.errors if case.expect == "fail" else CLASSIFIED - {"InternalError"}
        assert final.error.type in accepted, final.error
        assert successes == [] and len(dead) == 1
        assert dead[0]["responseContext"]["functionError"] == "Handled"
        assert outputs == [], "partial outputs left in the bucket"
    for name in case.names_files:
        assert name not in worker_run.trace, f"the worker's ffmpeg tried to open {name}"
    assert f"htons({corpus.port})" not in worker_run.trace
    assert corpus.listener_connections() == 0


@pytest.mark.integration
def test_the_worker_serves_the_next_job_and_leaves_nothing(worker_run: WorkerRun) -> None:
    assert worker_run.after.state == JobState.SUCCEEDED, worker_run.after.error
    assert "openat(" in worker_run.trace  # the trace saw the worker's activity
    assert list(worker_run.work.iterdir()) == []
    assert ffmpeg_processes(worker_run.work) == []
