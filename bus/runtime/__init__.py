"""The consumer runtime every worker runs on: leased partitions, batches, dead letters.

Worker authors need only the names below; the modules hold the internals.
They load on first use, so that importing one runtime module (``outage``,
``status``) does not pull in arq.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.runtime.batches import BatchHandler, Delivery
    from bus.runtime.consumer import GroupConsumer
    from bus.runtime.worker import WorkerContext, consumer_worker_settings

_LAZY = {
    "BatchHandler": "bus.runtime.batches",
    "Delivery": "bus.runtime.batches",
    "GroupConsumer": "bus.runtime.consumer",
    "WorkerContext": "bus.runtime.worker",
    "consumer_worker_settings": "bus.runtime.worker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bus.runtime' has no attribute {name!r}")


__all__ = ["BatchHandler", "Delivery", "GroupConsumer", "WorkerContext", "consumer_worker_settings"]
