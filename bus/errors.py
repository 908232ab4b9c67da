"""Exceptions raised by the bus.

The tree::

    BusError
    ├── ConfigError        settings that cannot work (bad prefix, bad number)
    ├── EventDecodeError   bytes on a stream that are not a bus event
    ├── AccessError        a stream token that is missing, forged, expired or for another scope
    ├── StreamError        a streaming client that cannot be served further
    │   ├── EventsMissed       its resume point is no longer in history
    │   ├── InvalidPosition    its resume point is malformed or lies beyond history
    │   ├── SlowConsumer       it fell behind its bounded queue
    │   └── ServerDraining     the frontend is shutting down (reconnect elsewhere)
    ├── FanoutConflict     another fan-out writer kept changing a trace's state under us
    ├── TraceConflictError a run tree kept changing under the trace worker's writes
    └── WebhookError
        ├── EndpointNotFound   no endpoint with that id
        └── UnsafeURLError     a webhook URL that resolves to a refused address

The callback handler never raises any of these into the app: it logs and
counts instead. They surface from the CLI, the workers and the admin APIs.
"""

from __future__ import annotations


class BusError(Exception):
    """Root of every error raised by the bus."""


class ConfigError(BusError):
    """Settings that cannot work."""


class EventDecodeError(BusError):
    """Bytes that do not decode as a bus event."""


class AccessError(BusError):
    """A stream or admin token that does not grant access."""


class StreamError(BusError):
    """A streaming client that cannot be served further; ``code`` goes on the wire."""

    code = "stream_error"


class EventsMissed(StreamError):
    """The client's resume point is no longer in history: it would get a gap."""

    code = "events_missed"


class InvalidPosition(StreamError):
    """The client's resume point is malformed or lies beyond the end of history."""

    code = "invalid_position"


class SlowConsumer(StreamError):
    """The client did not keep up with its bounded queue and was dropped."""

    code = "slow_consumer"


class ServerDraining(StreamError):
    """The frontend is shutting down: the client reconnects, to this or another frontend."""

    code = "server_shutdown"


class FanoutConflict(BusError):
    """The fan-out worker lost the race for a trace's state too many times in a row."""


class TraceConflictError(BusError):
    """A run tree kept changing under the trace worker's writes (the batch is retried)."""


class WebhookError(BusError):
    """A webhook endpoint or delivery problem."""


class EndpointNotFound(WebhookError):
    """No webhook endpoint has that id."""


class UnsafeURLError(WebhookError):
    """A webhook URL whose address is refused by the SSRF guard."""
