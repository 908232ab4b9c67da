"""The demo's embedded Redis: fakeredis over TCP (:mod:`bus.demo.fakeserver`) in a child process.

It lets ``make demo`` run on a machine with no Redis: workers, frontends and
the demo's own app connect to it by URL like to any Redis. It runs in a
process of its own, not in threads of the demo's, because the demo's process
also runs the LangChain app and the SSE client: sharing one interpreter lock
with them, every wake-up of a server thread waited for theirs.

``python -m bus.demo.embedded`` serves until SIGTERM, SIGINT, or the end of
its standard input (so it never outlives a parent that was killed), and prints
its URL as the first line of its standard output.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0


class EmbeddedRedis:
    """``with EmbeddedRedis() as url:`` a Redis-protocol server on a free loopback port."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, log: Path | None = None) -> None:
        self._args = [
            sys.executable,
            "-m",
            "bus.demo.embedded",
            "--host",
            host,
            "--port",
            str(port),
        ]
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> str:
        stderr = self._log.open("ab") if self._log else None
        try:
            # A session of its own: a Ctrl-C at the terminal reaches the demo and its
            # workers, and the server outlives them until close() stops it, last.
            self._process = process = subprocess.Popen(
                self._args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            if stderr:
                stderr.close()
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("redis://"):
            self.close()
            where = f"; see {self._log}" if self._log else ""
            raise OSError(f"the embedded Redis did not start{where}")
        self.url = line
        return line

    def close(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        finally:
            for pipe in (process.stdin, process.stdout):
                if pipe:
                    pipe.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _stop_at_end_of_input(stop: threading.Event) -> None:
    # Unbuffered: a thread blocked in sys.stdin's buffer would hold its lock at exit.
    while os.read(sys.stdin.fileno(), 4096):
        pass  # the parent writes nothing; the read ends when it closes the pipe, or dies
    stop.set()


def main(argv: list[str] | None = None) -> None:
    from bus.demo.fakeserver import FakeRedisServer

    parser = argparse.ArgumentParser(description="fakeredis over TCP, for the demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = FakeRedisServer(args.host, args.port)
    print(server.start(), flush=True)
    threading.Thread(target=_stop_at_end_of_input, args=(stop,), daemon=True).start()
    while not stop.wait(1.0):
        pass
    server.stop()


if __name__ == "__main__":
    main()
