"""A redis-server process owned by one test, to kill, pause and restart at will."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from bus.demo.ports import free_port
from tests.support.waiting import wait_until


class OwnedRedis:
    """``redis-server`` on a free port of its own: ``start()``, ``kill()``, ``pause()``...

    With ``aof=True`` every write is fsynced to the append-only file before it
    is acknowledged, so a SIGKILLed server restarts with every acknowledged
    write and a test can tell "the worker lost entries" from "Redis did".
    Without it a restarted server is empty. Use as a context manager, or call
    :meth:`close`, to kill it and remove its data directory.
    """

    def __init__(
        self, *, aof: bool = False, password: str | None = None, args: Sequence[str] = ()
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.aof = aof
        self.password = password
        self.args = list(args)
        """More ``redis-server`` options (say, ``--unixsocket PATH``)."""
        self.port = free_port()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="lcbus-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OwnedRedis:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.aof
            else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--dir", str(self.dir), *aof),
                *(("--requirepass", self.password) if self.password else ()),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        try:
            wait_until(lambda: self._pings(client), within=10, what="redis-server up", every=0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self, *, down_s: float = 0.0) -> None:
        """Kill the server, stay down ``down_s`` seconds, start it on the same port."""
        self.kill()
        time.sleep(down_s)
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections hang instead of failing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.process is not None, "the server is not running"
        self.process.send_signal(sig)

    def _pings(self, client: redis.Redis) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"redis-server on port {self.port} exited")
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
