"""What the endpoints of one frontend process share: settings, Redis, the hub."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import redis.asyncio as aioredis

from bus.frontend.hub import Hub
from bus.keys import Keys
from bus.settings import Settings


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    redis: aioredis.Redis
    keys: Keys
    hub: Hub
    shutdown: anyio.Event = field(default_factory=anyio.Event)
    """Set when the server begins to shut down (by the first stream that sees it)."""
