"""The trace worker: ``arq workers.traces.WorkerSettings`` (see :mod:`bus.traces.worker`)."""

from __future__ import annotations

from bus.traces.worker import worker_settings

WorkerSettings = worker_settings()
