"""The tests' SSE reader skips keep-alive pings, which httpx-sse reports as empty messages."""

from __future__ import annotations

import httpx

from tests.support.frontend import collect

BODY = (
    'id: 1\ndata: {"method": "messages"}\n\n'
    ": ping - 2026-01-01 00:00:00\n\n"
    'id: 2\ndata: {"method": "lifecycle"}\n\n'
    "event: end\ndata: {}\n\n"
)


async def test_pings_between_events_are_skipped() -> None:
    def stream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=BODY)

    async with httpx.AsyncClient(transport=httpx.MockTransport(stream)) as client:
        got = await collect(client, "GET", "http://frontend/traces/t/stream")
    assert got.envelopes == [{"method": "messages"}, {"method": "lifecycle"}]
    assert got.ids == ["1", "2"]
    assert got.ended is True
