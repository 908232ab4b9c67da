"""arq job starts in one round trip each (bus.runtime.jobstarts) against the real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func
from redis.asyncio.connection import Connection

from bus.keys import Keys
from bus.runtime.arqpool import PrefixedArqRedis, arq_pool
from bus.runtime.jobstarts import ClaimingJobStarts, claim_jobs_in_one_round_trip, running_worker
from bus.settings import Settings

QUEUE = "jobstarts-test"


class CountingConnection(Connection):
    """Counts its writes: one per command sent alone, one per pipeline."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[PrefixedArqRedis]:
    made = arq_pool(
        settings, queue=f"{settings.prefix}:{QUEUE}", connection_class=CountingConnection
    )
    yield made
    await made.aclose()


def _worker(pool: PrefixedArqRedis, ran: list[int], **options: Any) -> Worker:
    async def job(ctx: dict[str, Any], n: int) -> int:
        ran.append(n)
        return n

    defaults: dict[str, Any] = {"max_jobs": 50, "burst": True, "poll_delay": 0.01}
    return Worker(
        functions=[func(job, name="job")],
        queue_name=pool.default_queue_name,
        redis_pool=pool,
        handle_signals=False,
        log_results=False,
        **{**defaults, **options},
    )


async def test_each_start_is_one_round_trip_and_only_claimable_jobs_start(
    settings: Settings, pool: PrefixedArqRedis
) -> None:
    for n in range(20):
        await pool.enqueue_job("job", n, _job_id=f"j{n}")
    keys = Keys(settings.prefix)
    # Another worker holds j3; j4 was finished and left the queue since the poll.
    await pool.psetex(keys.arq(in_progress_key_prefix + "j3"), 60_000, b"1")
    await pool.zrem(pool.default_queue_name, "j4")
    ran: list[int] = []
    worker = _worker(pool, ran)
    claim_jobs_in_one_round_trip(worker, keys=keys)
    ids = [f"j{n}".encode() for n in range(20)]

    started: list[str] = []
    real_run_job = worker.run_job

    async def run_later(job_id: str, score: int) -> None:
        started.append(job_id)

    worker.run_job = run_later  # type: ignore[method-assign]
    # The script is loaded first: on a Redis that never ran it (a fresh server), the
    # first claim meets NOSCRIPT and costs a SCRIPT LOAD and a second try.
    await ClaimingJobStarts(worker, keys=keys).claim(["not-a-job"])
    CountingConnection.writes = 0
    await worker.start_jobs(ids)
    assert CountingConnection.writes == 20  # one per job (arq's own start_jobs: 4 per job)
    await asyncio.gather(*worker.tasks.values())
    assert started == [f"j{n}" for n in range(20) if n not in (3, 4)]
    assert worker.sem._value == 50  # every slot given back, taken or not

    # The next poll lists the jobs this worker is running again: no round trip for them.
    release = asyncio.Event()

    async def run_until_released(job_id: str, score: int) -> None:
        await release.wait()

    worker.run_job = run_until_released  # type: ignore[method-assign]
    worker.tasks.clear()
    await pool.enqueue_job("job", 50, _job_id="long")
    await worker.start_jobs([b"long"])
    CountingConnection.writes = 0
    await worker.start_jobs([b"long", b"long"])
    assert CountingConnection.writes == 0
    release.set()
    await asyncio.gather(*worker.tasks.values())

    # A claimed job is marked in progress: claiming it again starts nothing.
    worker.run_job = real_run_job  # type: ignore[method-assign]
    worker.tasks.clear()
    await pool.enqueue_job("job", 99, _job_id="again")
    await worker.start_jobs([b"again", b"again"])
    await asyncio.gather(*worker.tasks.values())
    assert ran == [99]


async def test_one_claim_takes_any_number_of_jobs(
    settings: Settings, pool: PrefixedArqRedis
) -> None:
    for n in range(3):
        await pool.enqueue_job("job", n, _job_id=f"c{n}")
    worker = _worker(pool, [])
    starts = ClaimingJobStarts(worker, keys=Keys(settings.prefix))
    CountingConnection.writes = 0
    first = await starts.claim(["c0", "c1", "missing", "c2"])
    assert CountingConnection.writes == 1
    assert [s is not None for s in first] == [True, True, False, True]
    assert await starts.claim(["c0", "c1", "c2"]) == [None, None, None]


async def test_no_more_jobs_start_than_free_slots(
    settings: Settings, pool: PrefixedArqRedis
) -> None:
    for n in range(5):
        await pool.enqueue_job("job", n, _job_id=f"s{n}")
    ran: list[int] = []
    worker = _worker(pool, ran, max_jobs=2)
    claim_jobs_in_one_round_trip(worker, keys=Keys(settings.prefix))
    await worker.start_jobs([f"s{n}".encode() for n in range(5)])
    await asyncio.gather(*worker.tasks.values())
    assert sorted(ran) == [0, 1, 2, 3, 4]
    assert worker.sem._value == 2


async def test_a_worker_started_by_arq_finds_itself_and_runs_its_jobs_in_one_round_trip(
    settings: Settings, pool: PrefixedArqRedis
) -> None:
    for n in range(10):
        await pool.enqueue_job("job", n)
    ran: list[int] = []
    found: list[Worker | None] = []

    async def startup(ctx: dict[str, Any]) -> None:
        worker = running_worker()
        found.append(worker)
        assert worker is not None
        claim_jobs_in_one_round_trip(worker, keys=Keys(settings.prefix))

    worker = _worker(pool, ran, on_startup=startup)
    await worker.async_run()
    assert found == [worker]
    assert isinstance(worker.start_jobs, ClaimingJobStarts)
    assert sorted(ran) == list(range(10))
    assert await pool.zcard(pool.default_queue_name) == 0
