"""The webhook worker: ``arq workers.webhooks.WorkerSettings`` (see :mod:`bus.webhooks.worker`)."""

from __future__ import annotations

from bus.runtime.eventloop import use_uvloop
from bus.webhooks.worker import worker_settings

use_uvloop()  # before arq builds its Worker, which takes the current loop

WorkerSettings = worker_settings()
