"""The token fan-out worker: ``arq workers.fanout.WorkerSettings``.

Consumes group ``fanout`` and turns bus events into LangChain agent streaming
protocol events in each trace's (and thread's) history, published live for
the streaming frontends. See :mod:`bus.fanout.handler`.
"""

from __future__ import annotations

from bus.fanout.handler import build_handler
from bus.runtime.worker import consumer_worker_settings

WorkerSettings = consumer_worker_settings(
    worker="fanout", group="fanout", build_handler=build_handler
)
