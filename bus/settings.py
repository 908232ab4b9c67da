"""One immutable settings object for every part of the bus.

Library code takes a :class:`Settings` as an argument; only entrypoints (the
CLI, worker modules, the demo) call :meth:`Settings.from_env`, so that the
environment is read in one place and tests can build settings directly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Literal

from bus.errors import ConfigError

ENV_PREFIX = "LCBUS_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

DropPolicy = Literal["oldest", "newest"]
ClusterMode = Literal["auto", "true", "false"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Configuration shared by the handler, the workers and the frontends.

    Every field maps to an environment variable ``LCBUS_<FIELD>`` (upper case);
    the README's configuration table lists them.
    """

    redis_url: str = DEFAULT_REDIS_URL
    """The data plane's Redis; on a Redis Cluster, any node (a seed)."""
    redis_cluster: ClusterMode = "auto"
    """Whether ``redis_url`` is a Redis Cluster; ``auto`` asks the node (``INFO cluster``)."""
    queue_redis_url: str = ""
    """arq's job queue (a standalone Redis: arq cannot run on a cluster); "" = ``redis_url``."""
    prefix: str = "lcbus"
    partitions: int = 8

    # Publisher (app side).
    buffer_size: int = 100_000
    buffer_bytes: int = 64 * 1024 * 1024
    """Bound of the publisher's buffer in encoded event bytes (beside ``buffer_size``)."""
    drop_policy: DropPolicy = "oldest"
    batch_size: int = 512
    flush_interval_ms: float = 2.0
    loop_flusher: bool = True
    """Drain from the app's event loop while it publishes from one (a thread otherwise)."""
    close_timeout_s: float = 2.0
    stream_maxlen: int = 1_000_000
    max_field_bytes: int = 64 * 1024

    # Consumers (worker side).
    lease_ttl_ms: int = 5_000
    read_count: int = 256
    read_block_ms: int = 1_000
    max_attempts: int = 3
    metrics_port: int = 0
    heartbeat_ms: int = 0
    """How often a replica renews leases and membership; 0 = min(lease_ttl_ms / 3, 1000)."""
    retry_backoff_ms: int = 50
    """First pause between handler attempts; doubles per attempt, capped at 2 s."""
    outage_tolerance_s: float = 120.0
    """How long an arq worker's own queue polling rides out a Redis outage before exiting."""

    # Per-trace history kept for streaming clients.
    history_maxlen: int = 100_000
    history_ttl_s: int = 24 * 3600

    # Fan-out worker: merge consecutive text deltas of one block produced within
    # this window (0 disables), and how many traces' state to keep in memory.
    fanout_coalesce_ms: float = 5.0
    fanout_cache_traces: int = 10_000

    # Read APIs (frontends): HMAC secret for stream tokens; open mode is for local development.
    stream_secret: str = ""
    open_access: bool = False
    admin_token: str = ""

    # Streaming frontends: keep-alive period, per-client queue bound, and how long one
    # write to a client may block before the client is dropped.
    ping_interval_s: float = 15.0
    client_queue_size: int = 1024
    client_queue_bytes: int = 16 * 1024 * 1024
    """The per-client queue's bound in payload bytes (beside ``client_queue_size`` events)."""
    client_stall_s: float = 3.0
    """A client whose current write has been blocked this long when a new event comes is
    dropped as a slow consumer; a dropped client whose write is still blocked this long
    after is disconnected (it gets ``slow_consumer`` if it reads by then)."""
    client_send_buffer_bytes: int = 256 * 1024
    """The kernel send buffer of each SSE connection (0: the OS's autotuned default, which
    lets a client that stopped reading hold megabytes before it is noticed)."""
    send_timeout_s: float = 30.0
    frontend_redis_connections: int = 64
    """Redis connections one frontend process opens at most; a request waits for a free one."""
    frontend_redis_wait_s: float = 20.0
    """How long a frontend request waits for a free Redis connection before it fails."""
    frontend_redis_timeout_s: float = 5.0
    """Socket timeout of a frontend's Redis commands: an outage ends streams with a retryable
    ``unavailable`` error instead of hanging them."""
    drain_s: float = 10.0
    """On SIGTERM a frontend tells its clients to reconnect and exits within this bound."""
    cors_origins: str = ""
    """Comma-separated origins whose browser pages may read streams (``*``: any); empty: none."""

    # Run trees kept by the trace worker.
    trace_ttl_s: int = 7 * 24 * 3600
    trace_complete_timeout_s: float = 600.0
    """A trace with no event for this long is completed with status ``timeout``."""
    trace_sweep_interval_s: float = 1.0
    trace_cache_size: int = 2000
    """Open traces whose state the trace worker keeps in memory between batches."""

    # Webhook delivery (see bus/delivery.py and bus/ssrf.py).
    webhook_timeout_s: float = 15.0
    webhook_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    """Seconds before each attempt (the first is usually 0), comma-separated."""
    webhook_jitter: float = 0.2
    webhook_retry_after_max_s: float = 3600.0
    """Upper bound on a receiver's Retry-After (a larger one is cut to this)."""
    webhook_allow_networks: str = ""
    """CIDRs the SSRF guard lets through although not public, e.g. "127.0.0.0/8,::1/128"."""
    webhook_disable_after_s: float = 5 * 24 * 3600
    """An endpoint failing this long without one success is disabled."""
    webhook_secret_grace_s: int = 24 * 3600
    """How long a rotated-out secret still signs deliveries."""
    webhook_attempts_maxlen: int = 1_000
    webhook_dead_maxlen: int = 100_000
    webhook_response_max_bytes: int = 1_024
    webhook_max_jobs: int = 256
    """Concurrent attempts per worker process (slow endpoints wait in Redis, not here)."""
    webhook_poll_delay_ms: int = 10
    webhook_local_wait_ms: int = 1_000
    """How long an attempt may wait in the worker process for its endpoint's own
    concurrency limit before it is deferred as a new job instead."""
    webhook_redis_connections: int = 64
    """Redis connections the webhook worker's attempts share (waiting when all are busy)."""
    webhook_registry_cache_ms: int = 1_000
    """How often the router re-reads the endpoint list even when the registry's version
    is unchanged (changes made through Endpoints bump it and apply at once)."""

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "{} "):
            raise ConfigError(f"prefix must be non-empty without braces or spaces: {self.prefix!r}")
        if self.redis_cluster not in ("auto", "true", "false"):
            raise ConfigError(
                f"redis_cluster must be 'auto', 'true' or 'false', got {self.redis_cluster!r}"
            )
        if self.partitions < 1:
            raise ConfigError(f"partitions must be >= 1, got {self.partitions}")
        if self.buffer_size < 1 or self.batch_size < 1 or self.buffer_bytes < 1:
            raise ConfigError("buffer_size, buffer_bytes and batch_size must be >= 1")
        if self.drop_policy not in ("oldest", "newest"):
            raise ConfigError(f"drop_policy must be 'oldest' or 'newest', got {self.drop_policy!r}")
        if self.ping_interval_s <= 0 or self.send_timeout_s <= 0:
            raise ConfigError("ping_interval_s and send_timeout_s must be > 0")
        if self.client_queue_size < 1:
            raise ConfigError(f"client_queue_size must be >= 1, got {self.client_queue_size}")
        if self.frontend_redis_connections < 2:
            raise ConfigError("frontend_redis_connections must be >= 2")
        if min(self.client_stall_s, self.frontend_redis_wait_s, self.drain_s) <= 0:
            raise ConfigError("client_stall_s, frontend_redis_wait_s and drain_s must be > 0")
        if self.lease_ttl_ms < 100 or self.read_count < 1 or self.max_attempts < 1:
            raise ConfigError("lease_ttl_ms must be >= 100, read_count and max_attempts >= 1")
        if self.trace_ttl_s < 1 or self.trace_complete_timeout_s <= 0:
            raise ConfigError("trace_ttl_s must be >= 1 and trace_complete_timeout_s > 0")
        if self.max_field_bytes < 256:
            raise ConfigError("max_field_bytes must be >= 256")
        if self.webhook_timeout_s <= 0 or not 0 <= self.webhook_jitter < 1:
            raise ConfigError("webhook_timeout_s must be > 0 and webhook_jitter in [0, 1)")
        if not self.webhook_delays:
            raise ConfigError("webhook_schedule needs at least one delay")

    @property
    def heartbeat_interval_s(self) -> float:
        ms = self.heartbeat_ms or min(self.lease_ttl_ms / 3, 1000)
        return ms / 1000

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def webhook_delays(self) -> tuple[float, ...]:
        """The parsed schedule: seconds to wait before attempt 1, 2, ..."""
        try:
            delays = tuple(float(x) for x in self.webhook_schedule.split(",") if x.strip())
        except ValueError as exc:
            raise ConfigError(f"webhook_schedule {self.webhook_schedule!r}: {exc}") from exc
        if any(d < 0 for d in delays):
            raise ConfigError(f"webhook_schedule {self.webhook_schedule!r} has a negative delay")
        return delays

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (settings are immutable)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The ``LCBUS_*`` variables that rebuild these settings in another process."""
        env: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            env[ENV_PREFIX + field.name.upper()] = (
                ("true" if value else "false") if isinstance(value, bool) else str(value)
            )
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``LCBUS_*`` variables (``REDIS_URL`` is honoured too)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if "REDIS_URL" in env:
            values["redis_url"] = env["REDIS_URL"]
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is None:
                continue
            values[field.name] = _parse(field.name, raw, field.type)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, raw: str, annotation: object) -> object:
    kind = str(annotation)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.strip().lower() in {"1", "true", "yes", "on"}
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw


def env_fields() -> list[tuple[str, str, object]]:
    """(variable, type, default) for each setting; used to document them."""
    return [
        (ENV_PREFIX + f.name.upper(), str(f.type), f.default) for f in dataclasses.fields(Settings)
    ]
