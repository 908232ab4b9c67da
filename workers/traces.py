"""The trace worker: ``arq workers.traces.WorkerSettings`` (see :mod:`bus.traces.worker`)."""

from __future__ import annotations

from bus.runtime.eventloop import use_uvloop
from bus.traces.worker import worker_settings

use_uvloop()  # before arq builds its Worker, which takes the current loop

WorkerSettings = worker_settings()
