"""Streaming frontends: SSE and WebSocket on LangChain's agent streaming protocol.

:func:`create_app` builds the ASGI app that ``lcbus serve`` runs. Each process
holds one Redis pub/sub connection (:class:`Hub`) shared by all its clients;
each client gets replay-then-live with no gap and no duplicate (:func:`follow`).
"""

from bus.frontend.app import create_app
from bus.frontend.filters import Filter
from bus.frontend.follow import Start, follow
from bus.frontend.hub import Hub
from bus.frontend.subscriber import Subscriber

__all__ = ["Filter", "Hub", "Start", "Subscriber", "create_app", "follow"]
