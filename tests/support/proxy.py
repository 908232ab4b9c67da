"""A TCP load balancer for tests: each new connection goes to the first backend that
accepts it, so a client whose frontend died reconnects to another one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Balancer:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.connections: list[tuple[str, int]] = []
        """The backend each accepted connection went to, in order."""
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for host, port in self.backends:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                continue
            self.connections.append((host, port))
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Balancer]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
