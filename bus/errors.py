"""Exceptions raised by the bus.

The tree::

    BusError
    ├── ConfigError        settings that cannot work (bad prefix, bad number)
    ├── EventDecodeError   bytes on a stream that are not a bus event
    ├── AccessError        a stream token that is missing, forged, expired or for another scope
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


class TraceConflictError(BusError):
    """A run tree kept changing under the trace worker's writes (the batch is retried)."""


class WebhookError(BusError):
    """A webhook endpoint or delivery problem."""


class EndpointNotFound(WebhookError):
    """No webhook endpoint has that id."""


class UnsafeURLError(WebhookError):
    """A webhook URL whose address is refused by the SSRF guard."""
