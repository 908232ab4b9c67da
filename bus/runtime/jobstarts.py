"""arq job starts in one round trip each instead of four.

arq's worker starts each job id a poll found with four round trips (``WATCH``
the in-progress key, ``EXISTS`` it, ``ZSCORE`` the job,
``MULTI``/``PSETEX``/``EXEC``). With many short jobs (webhook attempts) that
is most of the worker's Redis traffic. :class:`ClaimingJobStarts` claims a job
with one script instead: if no worker holds it (no in-progress key) and it is
still queued (a score), the script sets the in-progress mark and returns the
score. It runs atomically, so two workers never both claim a job, as arq's
``WATCH``/``MULTI`` guarantees; a claimed job then runs through arq's own
``run_job`` unchanged (its retries, timeouts, results and finishing). A job
this worker is running is skipped without asking: a job stays in the queue
until it finishes, so every poll lists the running ones first (arq checks
each of them again, four round trips each, every ``poll_delay``).

Jobs are still claimed one after the other, as arq does, not all of a poll
in one go (the script takes any number): a batch fills every free job slot
at once, and webhook attempts beyond their endpoints' local lines are then
deferred as new jobs. Measured with ``bench.webhooks``: 1,600 deferrals for
2,000 deliveries and a third of the throughput, against none one by one,
where starts keep the pace at which the event loop gets through them.

arq builds its worker itself (``arq module.WorkerSettings`` has no option for
another class), so :func:`running_worker` finds the worker that is running
the current start-up hook, and :func:`claim_jobs_in_one_round_trip` gives it
this ``start_jobs``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.worker import Worker

from bus.keys import Keys
from bus.scripts import LuaScript, execute

log = logging.getLogger(__name__)

# KEYS: queue, then one in-progress key per job. ARGV: in-progress ms, then the job ids.
# -> per job its score if it was claimed, else nil (held by a worker, or no longer queued).
_CLAIM = LuaScript("""
local claimed = {}
for i = 2, #KEYS do
  local score = false
  if redis.call('EXISTS', KEYS[i]) == 0 then
    score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score then redis.call('PSETEX', KEYS[i], ARGV[1], '1') end
  end
  claimed[i - 1] = score
end
return claimed
""")


class ClaimingJobStarts:
    """``worker.start_jobs`` replacement: one round trip per job started."""

    def __init__(self, worker: Worker, *, keys: Keys) -> None:
        self.worker = worker
        self.keys = keys

    async def __call__(self, job_ids: Sequence[bytes]) -> None:
        worker = self.worker
        for raw_id in job_ids:
            job_id = raw_id.decode()
            running = worker.tasks.get(job_id)
            if running is not None and not running.done():
                # Ours and running: a job stays queued until it finishes, so every
                # poll lists the running ones first; no need to ask Redis.
                continue
            await worker.sem.acquire()  # as arq does: a free job slot first
            try:
                (score,) = await self.claim([job_id])
            except BaseException:
                worker.sem.release()
                raise
            if score is None:
                worker.sem.release()
                log.debug("job %s already running elsewhere or done", job_id)
                continue
            task = worker.loop.create_task(worker.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: worker.sem.release())
            worker.tasks[job_id] = task

    async def claim(self, job_ids: Sequence[str]) -> list[Any]:
        """Claim these jobs in one round trip: each one's score, or None if not claimed."""
        worker = self.worker
        keys = [worker.queue_name, *(self.keys.arq(in_progress_key_prefix + j) for j in job_ids)]
        args = [int(worker.in_progress_timeout_s * 1000), *job_ids]
        (scores,) = await execute(
            worker.pool, (_CLAIM,), lambda pipe: _CLAIM.queue(pipe, keys, args)
        )
        return list(scores)


def running_worker() -> Worker | None:
    """The arq worker whose main task is running this code (its ``on_startup``), if any."""
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    found = frame.f_locals.get("self") if frame is not None else None
    return found if isinstance(found, Worker) else None


def claim_jobs_in_one_round_trip(worker: Worker, *, keys: Keys) -> None:
    """Make ``worker`` start its jobs with :class:`ClaimingJobStarts`."""
    worker.start_jobs = ClaimingJobStarts(worker, keys=keys)  # type: ignore[method-assign]
