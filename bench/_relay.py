"""The baseline of ``bench.clients``: the least an SSE relay of the live channels can do.

``python -m bench._relay PORT`` (prefix from ``LCBUS_PREFIX``): a raw asyncio
HTTP server, one pattern subscription on Redis for every trace channel, and
for each live message one frame built once and written to every client of
that trace, with no history, no resync, no ordering or gap checks, no
per-client queue or task beyond the connection's own, no keep-alive pings.
After a trace's final event it sends ``event: end`` and closes. A client that
connects mid-run gets only what is published after it, so its text is not
complete: this measures the floor of latency and memory, not correctness.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import defaultdict

import redis.asyncio as aioredis

from bench._sse_clients import raise_fd_limit
from bus.history import parse_message
from bus.keys import Keys

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-store\r\ntransfer-encoding: chunked\r\n\r\n"
)
END = b"event: end\ndata: {}\n\n"


def _chunk(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


class Relay:
    def __init__(self, redis_url: str, keys: Keys) -> None:
        self._redis = aioredis.Redis.from_url(redis_url)
        self._keys = keys
        self._clients: defaultdict[bytes, set[asyncio.StreamWriter]] = defaultdict(set)
        self._ended: set[bytes] = set()

    async def pump(self) -> None:
        pubsub = self._redis.pubsub()
        await pubsub.psubscribe(self._keys.channel("*"))
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            writers = self._clients.get(message["channel"])
            if not writers:
                continue
            item = parse_message(message["data"])
            data = _chunk(b"id: %s\ndata: %s\n\n" % (item.event_id.encode(), item.envelope()))
            if item.final:
                data += _chunk(END) + b"0\r\n\r\n"
            for writer in writers:
                writer.write(data)
            if item.final:
                for writer in writers:
                    writer.close()
                del self._clients[message["channel"]]
                self._ended.add(message["channel"])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        path = head.split(b" ", 2)[1].decode()
        if path == "/healthz":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            writer.close()
            return
        trace_id = path.split("/")[2]
        channel = self._keys.channel(trace_id).encode()
        writer.write(HEAD)
        if channel in self._ended:
            writer.write(_chunk(END) + b"0\r\n\r\n")
            writer.close()
            return
        self._clients[channel].add(writer)
        try:
            await reader.read()  # until the client goes, or the relay closes the stream
        except ConnectionError:
            pass
        finally:
            self._clients.get(channel, set()).discard(writer)
            writer.close()


async def main(port: int) -> None:
    relay = Relay(os.environ["LCBUS_REDIS_URL"], Keys(os.environ["LCBUS_PREFIX"]))
    pump = asyncio.create_task(relay.pump())
    server = await asyncio.start_server(relay.serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await asyncio.gather(server.serve_forever(), pump)


if __name__ == "__main__":
    raise_fd_limit()
    asyncio.run(main(int(sys.argv[1])))
