"""Starting arq workers and other children as real processes, on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from bus.settings import Settings
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
PROBE = "tests.support.probe_worker.WorkerSettings"


def start_worker(
    settings: Settings, log_path: Path, *, target: str = PROBE, **extra: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **settings.to_env(), **extra}
    env.pop("REDIS_URL", None)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "arq", target], cwd=ROOT, env=env, stdout=log, stderr=log
        )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    process.wait(timeout=30)


def spawn(args: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python <args>`` from the repository root with the project importable."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env)


def wait_http(url: str, within: float = 20.0) -> None:
    """Wait until ``url`` answers with anything but a server error."""

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(answers, within=within, what=f"{url} up")
