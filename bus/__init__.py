"""A Redis Streams event bus for LangChain callbacks.

Attach :class:`BusCallbackHandler` to any LangChain run; its events reach
worker processes (webhooks, run trees, token fan-out) and streaming frontends
through Redis. ``__all__`` lists what app code uses: the handler, settings,
stream tokens, trace queries, cross-process trace headers, the frontend app,
the webhook registry, errors and event codecs. Worker authors import from
:mod:`bus.runtime`; internals come from their modules. The frontend, the
webhook registry and the runtime load on first use, so that ``import bus`` in
an app process stays light (neither the web stack nor arq nor
prometheus_client).
"""

from typing import TYPE_CHECKING, Any

from bus.errors import (
    AccessDenied,
    AccessError,
    BusError,
    ConfigError,
    EndpointNotFound,
    EventDecodeError,
    EventRejected,
    EventsMissed,
    InvalidPosition,
    InvalidQuery,
    ServerDraining,
    SlowConsumer,
    StateConflict,
    StreamError,
    TraceContextError,
    UnsafeURLError,
    WebhookError,
)
from bus.events import Event, decode, decode_json, encode, encode_json
from bus.producer.callbacks import BusCallbackHandler
from bus.producer.propagation import continue_trace, trace_headers
from bus.settings import Settings
from bus.tokens import stream_token, thread_token, verify_token
from bus.traces.queries import TracePage, get_trace, list_traces
from bus.traces.tree import RunNode, Trace, TraceSummary

if TYPE_CHECKING:
    # The aliases mark as re-exported the names that stay out of __all__ (see _LAZY).
    from bus.frontend import create_app
    from bus.keys import Keys as Keys
    from bus.keys import partition_of as partition_of
    from bus.producer.publisher import Publisher as Publisher
    from bus.producer.stats import PublisherStats as PublisherStats
    from bus.runtime import BatchHandler as BatchHandler
    from bus.runtime import Delivery as Delivery
    from bus.runtime import GroupConsumer as GroupConsumer
    from bus.runtime import WorkerContext as WorkerContext
    from bus.runtime import consumer_worker_settings as consumer_worker_settings
    from bus.webhooks.endpoints import Endpoint, Endpoints

_LAZY = {
    "create_app": "bus.frontend",
    "Endpoint": "bus.webhooks.endpoints",
    "Endpoints": "bus.webhooks.endpoints",
    # Importable from here as before, but not part of the app-facing surface:
    # worker authors use bus.runtime, internals their modules.
    "Keys": "bus.keys",
    "partition_of": "bus.keys",
    "Publisher": "bus.producer.publisher",
    "PublisherStats": "bus.producer.stats",
    "BatchHandler": "bus.runtime",
    "Delivery": "bus.runtime",
    "GroupConsumer": "bus.runtime",
    "WorkerContext": "bus.runtime",
    "consumer_worker_settings": "bus.runtime",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AccessDenied",
    "AccessError",
    "BusCallbackHandler",
    "BusError",
    "ConfigError",
    "Endpoint",
    "EndpointNotFound",
    "Endpoints",
    "Event",
    "EventDecodeError",
    "EventRejected",
    "EventsMissed",
    "InvalidPosition",
    "InvalidQuery",
    "RunNode",
    "ServerDraining",
    "Settings",
    "SlowConsumer",
    "StateConflict",
    "StreamError",
    "Trace",
    "TraceContextError",
    "TracePage",
    "TraceSummary",
    "UnsafeURLError",
    "WebhookError",
    "continue_trace",
    "create_app",
    "decode",
    "decode_json",
    "encode",
    "encode_json",
    "get_trace",
    "list_traces",
    "stream_token",
    "thread_token",
    "trace_headers",
    "verify_token",
]
