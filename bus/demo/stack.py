"""The processes the demo runs: workers, frontend, model server, webhook receiver.

Each is a real child process started from its own command line, exactly as a
deployment would start it (``arq workers.NAME.WorkerSettings``, the frontend,
...), and every one is stopped, SIGTERM first, when the stack closes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import httpx
import redis

from bus.keys import Keys
from bus.settings import Settings

WORKERS = ("fanout", "traces", "webhooks")
STOP_GRACE_S = 10.0


class DemoError(RuntimeError):
    """Something the demo needs did not come up; the message says what."""


class Stack:
    """Starts child processes with the demo's settings and stops them all on close."""

    def __init__(self, settings: Settings, *, log_dir: Path, quiet: bool = True) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.quiet = quiet
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._env = {**os.environ, **settings.to_env()}
        self._env.pop("REDIS_URL", None)

    def spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, *args],
            env={**self._env, **(env or {})},
            stdout=log if self.quiet else None,
            stderr=log if self.quiet else None,
        )
        log.close()

    def start_workers(self) -> None:
        for worker in WORKERS:
            self.spawn(worker, ["-m", "arq", f"workers.{worker}.WorkerSettings"])

    def wait_workers(self, within: float = 30.0) -> None:
        keys = Keys(self.settings.prefix, self.settings.partitions)
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            self._wait(
                lambda: all(client.zcard(keys.members(w)) > 0 for w in WORKERS),
                within,
                "the three workers to join their consumer groups",
            )
        finally:
            client.close()

    def wait_http(self, name: str, url: str, within: float = 30.0) -> None:
        def answers() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait(answers, within, f"{name} at {url}")

    def _wait(self, check: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not check():
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise DemoError(f"{', '.join(dead)} exited early; see {self.log_dir}")
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {within:.0f} s waiting for {what}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The process ids of the children (all stopped once the stack closes)."""
        return [p.pid for p in self.processes.values()]

    def close(self) -> None:
        """SIGTERM every process, then SIGKILL whatever outlives the grace period."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes.values():
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
