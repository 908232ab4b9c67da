"""A Redis Streams event bus for LangChain callbacks.

Attach :class:`BusCallbackHandler` to any LangChain run; its events reach
worker processes (webhooks, run trees, token fan-out) and streaming frontends
through Redis. Everything a user calls is importable from here; the frontend
app and the webhook registry load on first use, so that ``import bus`` in an
app process stays light.
"""

from typing import TYPE_CHECKING, Any

from bus.errors import (
    AccessError,
    BusError,
    ConfigError,
    EndpointNotFound,
    EventDecodeError,
    EventsMissed,
    FanoutConflict,
    InvalidPosition,
    ServerDraining,
    SlowConsumer,
    StreamError,
    TraceConflictError,
    UnsafeURLError,
    WebhookError,
)
from bus.events import Event, decode, decode_json, encode, encode_json
from bus.keys import Keys, partition_of
from bus.producer.callbacks import BusCallbackHandler
from bus.producer.publisher import Publisher, PublisherStats
from bus.runtime.consumer import BatchHandler, Delivery, GroupConsumer
from bus.runtime.worker import WorkerContext, consumer_worker_settings
from bus.settings import Settings
from bus.tokens import stream_token, thread_token, verify_token
from bus.traces.store import get_trace, list_traces
from bus.traces.tree import RunNode, Trace, TraceSummary

if TYPE_CHECKING:
    from bus.frontend import create_app
    from bus.webhooks.endpoints import Endpoint, Endpoints

_LAZY = {
    "create_app": "bus.frontend",
    "Endpoint": "bus.webhooks.endpoints",
    "Endpoints": "bus.webhooks.endpoints",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bus' has no attribute {name!r}")


__all__ = [
    "AccessError",
    "BatchHandler",
    "BusCallbackHandler",
    "BusError",
    "ConfigError",
    "Delivery",
    "Endpoint",
    "EndpointNotFound",
    "Endpoints",
    "Event",
    "EventDecodeError",
    "EventsMissed",
    "FanoutConflict",
    "GroupConsumer",
    "InvalidPosition",
    "Keys",
    "Publisher",
    "PublisherStats",
    "RunNode",
    "ServerDraining",
    "Settings",
    "SlowConsumer",
    "StreamError",
    "Trace",
    "TraceConflictError",
    "TraceSummary",
    "UnsafeURLError",
    "WebhookError",
    "WorkerContext",
    "consumer_worker_settings",
    "create_app",
    "decode",
    "decode_json",
    "encode",
    "encode_json",
    "get_trace",
    "list_traces",
    "partition_of",
    "stream_token",
    "thread_token",
    "verify_token",
]
