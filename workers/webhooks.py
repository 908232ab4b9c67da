"""The webhook worker: ``arq workers.webhooks.WorkerSettings`` (see :mod:`bus.webhooks.worker`)."""

from __future__ import annotations

from bus.webhooks.worker import worker_settings

WorkerSettings = worker_settings()
