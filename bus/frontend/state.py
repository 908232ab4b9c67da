"""What the endpoints of one frontend process share: settings, Redis, the hub."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from bus.frontend.event_stream import EventStreams
from bus.frontend.hub import Hub
from bus.keys import Keys
from bus.settings import Settings


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    redis: aioredis.Redis
    keys: Keys
    hub: Hub
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server begins to shut down (see :func:`bus.frontend.sse.drain_on_shutdown`)."""
    streams: EventStreams = field(default_factory=EventStreams)
    """The process's open SSE streams."""
