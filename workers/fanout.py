"""The fan-out worker: ``arq workers.fanout.WorkerSettings`` (see :mod:`bus.fanout.worker`)."""

from __future__ import annotations

from bus.fanout.worker import worker_settings

WorkerSettings = worker_settings()
