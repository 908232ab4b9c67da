"""What the endpoints of one frontend process share: settings, Redis, the hub."""

from __future__ import annotations

from dataclasses import dataclass

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
