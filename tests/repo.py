"""The repo root, and running a job as a user would (``python -m jobs.<job>`` from there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(job: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m jobs.<job> args...`` from the repo root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", f"jobs.{job}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
