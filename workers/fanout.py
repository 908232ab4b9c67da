"""The fan-out worker: ``arq workers.fanout.WorkerSettings`` (see :mod:`bus.fanout.worker`)."""

from __future__ import annotations

from bus.fanout.worker import worker_settings
from bus.runtime.eventloop import use_uvloop

use_uvloop()  # before arq builds its Worker, which takes the current loop

WorkerSettings = worker_settings()
