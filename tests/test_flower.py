"""Flower shows a running job: a real worker, a real Flower with basic auth, headless Chromium.

The screenshot of the task page is kept under tests/artifacts/ (git-ignored); its path is
printed. Celery merges a custom `task-progress` event's fields into the task; Flower's task
page renders the state badge and the `result` field, so that is where the percent must be.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, missing_service, wait_for

from transcoder import service
from transcoder.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.browser]

FLOWER_USER, FLOWER_PASSWORD = "flower-user", "flower-test-pw"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1100",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    missing_service("headless Chromium is not installed (apt-get install chromium)")
    raise AssertionError  # unreachable


def browse(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (or, with `screenshot`, a PNG of it)."""
    args = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    result = subprocess.run(
        [*args, url], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def stack(redis_url: str, s3_server, tmp_path: Path, ffmpeg_available: None) -> Iterator[dict]:  # type: ignore[no-untyped-def]
    """A worker (-E) and Flower (basic auth) on the test Redis and moto."""
    from workers import FAST_ENV, Worker

    chromium()  # skip (or fail in CI) before starting anything
    env = {
        **s3_server.env(),
        **FAST_ENV,
        "TRANSCODER_REDIS_URL": redis_url,
        "TRANSCODER_WORK_DIR": str(tmp_path / "work"),
    }
    worker = Worker("flower", env, tmp_path, concurrency=1).start()
    port = free_port()
    flower_log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}"],
        cwd=ROOT, env={**os.environ, **env}, stdout=flower_log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    flower_log.close()
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=10
    )
    try:
        worker.wait_ready()

        def sees_worker() -> bool:
            assert flower.poll() is None, (tmp_path / "flower.log").read_text()[-2000:]
            try:
                workers = http.get("/api/workers", params={"status": "true"}).json()
            except (httpx.HTTPError, ValueError):
                return False
            return bool(workers.get(worker.hostname))

        wait_for(sees_worker, 45, "Flower to see the worker's events", interval_s=0.3)
        names = {k.removeprefix("TRANSCODER_").lower(): v for k, v in env.items()}
        yield {
            "http": http,
            "url": f"http://{FLOWER_USER}:{FLOWER_PASSWORD}@127.0.0.1:{port}",
            "settings": Settings(**names),
            "worker": worker,
        }
    finally:
        http.close()
        flower.terminate()
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            flower.kill()
        worker.stop()


def test_flower_shows_the_running_job_and_its_progress(
    stack, s3_server, make_media, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    http: httpx.Client = stack["http"]
    settings: Settings = stack["settings"]
    # long enough to watch: a minute of video upscaled to 1080p VP9, stopped once seen
    source = make_media("long.mp4", duration_s=60, size="640x360")
    s3 = s3_server.client()
    s3.make_bucket("flower-media")
    s3.fput_object("flower-media", "in/long.mp4", str(source))
    submitted = service.submit(
        {
            "bucket": "flower-media",
            "object": "in/long.mp4",
            "output_dir": "out",
            "dst_format": "webm",
            "height": 1080,
            "invocation_id": "flower_job",
        },
        settings=settings,
    )
    job_id = submitted.record.id

    def flower_task() -> dict | None:
        tasks = http.get("/api/tasks").json()
        for uuid, task in tasks.items():
            # the transcode task only: a dead-letter task for the job also names it
            if task.get("name") != "transcoder.transcode":
                continue
            if job_id in str(task.get("kwargs")) or job_id in str(task.get("args")):
                return {"uuid": uuid, **task}
        return None

    def in_progress() -> dict | None:
        task = flower_task()
        return task if task and task.get("state") == "PROGRESS" else None

    task = wait_for(in_progress, 60, "Flower to show the task in PROGRESS", interval_s=0.3)
    assert task["name"] == "transcoder.transcode"
    time.sleep(1.5)  # let a few progress events pass so the percent is above zero

    page_url = f"{stack['url']}/task/{task['uuid']}"
    profile = tmp_path / "chromium"
    dom = browse(page_url, profile)
    record = service.get_job(job_id, settings=settings)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / f"flower-task-{time.strftime('%Y%m%d-%H%M%S')}.png"
    browse(page_url, profile, screenshot=screenshot)
    print(f"\nFlower task page screenshot: {screenshot}")

    assert record.state.value == "running", record.state
    assert "transcoder.transcode" in dom
    assert re.search(r"badge[^>]*>\s*PROGRESS\s*<", dom), "state badge is not PROGRESS"
    result_cell = re.search(r"<dt>Result</dt>\s*<dd>(.*?)</dd>", dom, re.S)
    assert result_cell, "no Result row on the task page"
    assert re.search(r"\d+(\.\d+)?\s*%", result_cell.group(1)), (
        f"the task page shows no percent in its Result: {result_cell.group(1)[:300]!r}"
    )
    assert screenshot.exists() and screenshot.stat().st_size > 5000

    # a stopped job must not stay PROGRESS (Celery ranks custom states below REVOKED)
    service.stop_job(job_id, settings=settings)
    wait_for(
        lambda: service.get_job(job_id, settings=settings).state.value == "stopped",
        30,
        "the job to stop",
        interval_s=0.2,
    )
    final = wait_for(
        lambda: (t := flower_task()) and t["state"] not in ("PROGRESS", "STARTED") and t,
        20,
        "Flower to leave PROGRESS after the stop",
        interval_s=0.3,
    )
    assert final["state"] in ("SUCCESS", "FAILURE", "REVOKED")


def test_flower_requires_basic_auth(stack) -> None:  # type: ignore[no-untyped-def]
    url = str(stack["http"].base_url)
    assert httpx.get(f"{url}/tasks", timeout=10).status_code == 401
    assert httpx.get(f"{url}/tasks", auth=("flower-user", "wrong"), timeout=10).status_code == 401
    assert stack["http"].get("/tasks").status_code == 200
