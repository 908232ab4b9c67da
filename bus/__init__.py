"""A Redis Streams event bus for LangChain callbacks.

Attach :class:`BusCallbackHandler` to any LangChain run; its events reach
worker processes (webhooks, run trees, token fan-out) and streaming frontends
through Redis.
"""

from bus.errors import (
    AccessError,
    BusError,
    ConfigError,
    EndpointNotFound,
    EventDecodeError,
    FanoutConflict,
    UnsafeURLError,
    WebhookError,
)
from bus.events import Event, decode, decode_json, encode, encode_json
from bus.handler import BusCallbackHandler
from bus.keys import Keys, partition_of
from bus.publisher import Publisher, PublisherStats
from bus.settings import Settings

__all__ = [
    "AccessError",
    "BusCallbackHandler",
    "BusError",
    "ConfigError",
    "EndpointNotFound",
    "Event",
    "EventDecodeError",
    "FanoutConflict",
    "Keys",
    "Publisher",
    "PublisherStats",
    "Settings",
    "UnsafeURLError",
    "WebhookError",
    "decode",
    "decode_json",
    "encode",
    "encode_json",
    "partition_of",
]
