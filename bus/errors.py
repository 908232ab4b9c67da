"""Exceptions raised by the bus.

The tree::

    BusError
    ├── ConfigError        settings that cannot work (bad prefix, bad number)
    ├── EventDecodeError   bytes on a stream that are not a bus event
    ├── EventRejected      an event a consumer refuses: it breaks a bound (dead-lettered at once)
    ├── AccessError        a stream token that is forged, expired or for another scope
    │   └── AccessDenied       a refused HTTP request (401 without a token, else 403)
    ├── StreamError        a streaming client that cannot be served further
    │   ├── EventsMissed       its resume point is no longer in history
    │   ├── InvalidPosition    its resume point is malformed or lies beyond history
    │   └── SlowConsumer       it fell behind its bounded queue
    ├── InvalidQuery       a query or option with a bad filter, limit, cursor or KEY=VALUE
    ├── StateConflict      another writer kept changing a trace's stored state under us
    ├── TraceContextError  trace headers (``bus.continue_trace``) that do not name a run
    └── WebhookError
        ├── EndpointNotFound   no endpoint with that id
        └── UnsafeURLError     a webhook URL that resolves to a refused address

The callback handler never raises any of these into the app: it logs and
counts instead. They surface from the CLI, the workers, the admin APIs and
``continue_trace``.
"""

from __future__ import annotations


class BusError(Exception):
    """Root of every error raised by the bus."""


class ConfigError(BusError):
    """Settings that cannot work."""


class EventDecodeError(BusError):
    """Bytes that do not decode as a bus event."""


class EventRejected(BusError):
    """An event a consumer refuses, such as an index or size beyond its bound.

    Raised by a batch handler; the consumer dead-letters the event with reason
    ``rejected`` and this message, without retrying (the same input is refused
    the same way), and carries on with the rest.
    """


class AccessError(BusError):
    """A stream or admin token that does not grant access."""


class AccessDenied(AccessError):
    """A refused request; ``status`` is the HTTP status (401 or 403)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


class InvalidQuery(BusError):
    """A query or option that cannot be parsed: a bad filter, limit, cursor or KEY=VALUE pair."""


class StateConflict(BusError):
    """Another writer kept changing a trace's stored state under us.

    The fan-out state and the run tree are written with a compare-and-set on
    their version; a worker that loses that race too many times in a row
    raises this, and the runtime retries the batch.
    """


class TraceContextError(BusError, ValueError):
    """Trace headers that do not name a run (a malformed id, say)."""


class WebhookError(BusError):
    """A webhook endpoint or delivery problem."""


class EndpointNotFound(WebhookError):
    """No webhook endpoint has that id."""


class UnsafeURLError(WebhookError):
    """A webhook URL whose address is refused by the SSRF guard."""
