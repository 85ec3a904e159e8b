"""The chaos soak's CI version: 30 jobs, 3 workers, a worker SIGKILLed every 2.5 s, one Redis
crash-restart (bench/chaos_soak.py; the full run is 200 jobs with a kill every ~10 s)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, missing_service

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_thirty_jobs_under_chaos_each_succeed_exactly_once(ffmpeg_available: None) -> None:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed")
    moto = shutil.which("moto_server") or Path(sys.executable).parent / "moto_server"
    if not Path(moto).exists():
        missing_service("moto_server is not installed (pip install 'moto[server]')")
    # 30 short jobs take ~15 s: a kill every 2.5 s (not 10) so several land mid-job
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos_soak.py"), "--jobs", "30",
         "--kill-every-s", "2.5", "--timeout-s", "150"],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip

    print(result.stdout)  # the table, for the CI log
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout
    kills = next(line for line in result.stdout.splitlines() if line.startswith("worker kills"))
    assert int(kills.split()[-2]) >= 2, kills  # the chaos really happened
