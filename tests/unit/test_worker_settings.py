"""consumer_worker_settings builds a class arq reads its options from; WorkerContext lookups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.worker import get_kwargs

from bus.runtime.consumer import BatchHandler, Delivery
from bus.runtime.worker import WorkerContext, consumer_worker_settings, worker_context
from bus.settings import Settings
from bus.webhooks.worker import worker_settings as webhook_worker_settings

SETTINGS = Settings(redis_url="redis://127.0.0.1:1/0", prefix="unit")


async def _ignore(batch: Sequence[Delivery]) -> None:
    return None


async def _build(ctx: WorkerContext) -> BatchHandler:
    return _ignore


def test_arq_options_are_in_the_class_arq_reads() -> None:
    cls = consumer_worker_settings(
        worker="probe",
        group="probe",
        build_handler=_build,
        settings=SETTINGS,
        max_jobs=7,
        poll_delay=0.25,
        job_timeout=12.0,
    )
    kwargs = get_kwargs(cls)
    assert (kwargs["max_jobs"], kwargs["poll_delay"], kwargs["job_timeout"]) == (7, 0.25, 12.0)
    assert kwargs["queue_name"] == "unit:arq:probe"
    assert kwargs["handle_signals"] is False


def test_unset_arq_options_keep_arq_defaults() -> None:
    cls = consumer_worker_settings(
        worker="probe", group="probe", build_handler=_build, settings=SETTINGS
    )
    kwargs = get_kwargs(cls)
    assert {"max_jobs", "poll_delay", "job_timeout"}.isdisjoint(kwargs)
    assert [f.name for f in kwargs["functions"]] == ["consumer_stats"]


def test_webhook_worker_takes_its_options_from_settings() -> None:
    settings = SETTINGS.replace(
        webhook_max_jobs=33, webhook_poll_delay_ms=40, webhook_timeout_s=3.0
    )
    kwargs = get_kwargs(webhook_worker_settings(settings))
    assert (kwargs["max_jobs"], kwargs["poll_delay"], kwargs["job_timeout"]) == (33, 0.04, 8.0)
    (job,) = kwargs["functions"]
    assert (job.name, job.timeout_s) == ("deliver_webhook", 8.0)
    assert kwargs["queue_name"] == "unit:arq:webhooks"


class _Service:
    pass


def test_context_attaches_to_arq_ctx_and_serves_what_was_provided() -> None:
    ctx: dict[str, Any] = {}
    wctx = WorkerContext(settings=SETTINGS, redis=aioredis.Redis(), arq=ctx)
    service = _Service()
    wctx.provide(service)
    assert worker_context(ctx) is wctx
    assert worker_context(ctx).service(_Service) is service


def test_missing_service_and_context_are_clear_errors() -> None:
    wctx = WorkerContext(settings=SETTINGS, redis=aioredis.Redis(), arq={})
    with pytest.raises(LookupError, match="this worker provides no _Service"):
        wctx.service(_Service)
    with pytest.raises(LookupError, match="not built by consumer_worker_settings"):
        worker_context({})
