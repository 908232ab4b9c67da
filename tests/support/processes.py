"""Starting arq workers and a private redis-server as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
import redis

from bus.settings import Settings

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


def wait_for(check: Callable[[], bool], within: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    # appendfsync always: a SIGKILLed server restarts with every acknowledged
    # write, so the test can tell "the worker lost entries" from "Redis did".
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(data_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client), within=10, what="redis-server up")
    finally:
        client.close()
    return process


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


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

    wait_for(answers, within=within, what=f"{url} up")
