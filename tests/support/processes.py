"""Starting arq workers and a private redis-server as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bus.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROBE = "tests.support.probe_worker.WorkerSettings"


def settings_env(settings: Settings) -> dict[str, str]:
    return {
        "LCBUS_REDIS_URL": settings.redis_url,
        "LCBUS_PREFIX": settings.prefix,
        "LCBUS_PARTITIONS": str(settings.partitions),
        "LCBUS_LEASE_TTL_MS": str(settings.lease_ttl_ms),
        "LCBUS_READ_COUNT": str(settings.read_count),
        "LCBUS_READ_BLOCK_MS": str(settings.read_block_ms),
        "LCBUS_MAX_ATTEMPTS": str(settings.max_attempts),
        "LCBUS_RETRY_BACKOFF_MS": str(settings.retry_backoff_ms),
    }


def start_worker(
    settings: Settings, log_path: Path, *, target: str = PROBE, **extra: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **settings_env(settings), **extra}
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
