"""Turns the runs LangChain reports into events on the publisher's buffer.

The handler (:mod:`bus.producer.callbacks`) speaks LangChain's callback API;
this speaks the bus's: a run's start registers it with its trace, every event
gets the run's identity and the trace's next sequence number, and the encoded
event goes to the run's partition. The run's name, tags and metadata ride on
its start and end events and on the events in between, but not on per-token
events (consumers that need them keep them per run), so a run's 50 KB of
metadata costs 50 KB per run, not per token. Events go through
:func:`~bus.producer.sanitize.encode_event`: a string that cannot be encoded
(a lone surrogate) is repaired, and a run's end always goes out.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from bus import events as ev
from bus.producer import payloads
from bus.producer.publisher import Publisher
from bus.producer.runs import Run, RunRegistry
from bus.producer.sanitize import encode_event, safe
from bus.settings import Settings


class RunEmitter:
    """Publishes the start, end and in-between events of the runs of one handler."""

    __slots__ = ("max_bytes", "publisher", "runs")

    def __init__(self, publisher: Publisher, settings: Settings) -> None:
        self.publisher = publisher
        self.runs = RunRegistry(settings.partitions)
        self.max_bytes = settings.max_field_bytes

    def emit(self, cls: type[ev.BaseEvent], run: Run, fields: dict[str, Any]) -> None:
        """Publish one event of ``run`` with its own ``fields``."""
        trace = run.trace
        event = cls(
            id=ev.new_event_id(),
            time=time.time(),
            run_id=run.run_id,
            trace_id=trace.trace_id,
            seq=next(trace.seq),
            parent_run_id=run.parent_run_id,
            name=run.name,
            run_type=run.run_type,
            tags=run.tags,
            metadata=run.metadata,
            source=self.publisher.source,
            **fields,
        )
        self.publisher.publish(trace.partition, encode_event(event))

    def emit_token(self, cls: type[ev.BaseEvent], run: Run, fields: dict[str, Any]) -> None:
        """Publish one per-token event of ``run``: its identity, without its name, tags
        and metadata."""
        trace = run.trace
        event = cls(
            id=ev.new_event_id(),
            time=time.time(),
            run_id=run.run_id,
            trace_id=trace.trace_id,
            seq=next(trace.seq),
            parent_run_id=run.parent_run_id,
            run_type=run.run_type,
            source=self.publisher.source,
            **fields,
        )
        self.publisher.publish(trace.partition, encode_event(event))

    def emit_new_token(self, run: Run, token: str, tool_call_chunks: Any = None) -> None:
        """:meth:`emit_token` for ``LLMNewToken``, the event of every streamed token,
        without the keyword dict: about a tenth of the handler's cost per token."""
        trace = run.trace
        publisher = self.publisher
        event = ev.LLMNewToken(
            id=ev.new_event_id(),
            time=time.time(),
            run_id=run.run_id,
            trace_id=trace.trace_id,
            seq=next(trace.seq),
            parent_run_id=run.parent_run_id,
            run_type=run.run_type,
            source=publisher.source,
            token=token,
            tool_call_chunks=tool_call_chunks or [],
        )
        publisher.publish(trace.partition, encode_event(event))

    def start(
        self,
        cls: type[ev.RunStart],
        *,
        serialized: dict[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        callback_kwargs: dict[str, Any],
        run_type: str,
        fields: dict[str, Any],
    ) -> None:
        """Register the run, then publish its start event.

        ``callback_kwargs`` are the start callback's other keyword arguments:
        LangChain passes a run's own ``name`` and ``run_type`` there, and they
        win over the serialized name and the callback's default ``run_type``.
        """
        run = self.runs.start(
            run_id,
            parent_run_id,
            name=payloads.run_name(serialized, callback_kwargs),
            run_type=callback_kwargs.get("run_type") or run_type,
            tags=list(tags or ()),
            metadata=safe(metadata, max_bytes=self.max_bytes) if metadata else {},
        )
        self.emit(cls, run, fields)

    def finish(
        self,
        cls: type[ev.RunEnd | ev.RunError],
        run_id: UUID,
        parent_run_id: UUID | None,
        fields: dict[str, Any],
    ) -> None:
        """Publish the run's end or error event, then forget the run.

        The end goes out even when its payload cannot be encoded (without the
        payload then): consumers wait for it to finish the run, its trace and
        its streams. The failure still reaches the caller, to be counted.
        """
        run = self.runs.lookup(run_id, parent_run_id)
        try:
            self.emit(cls, run, fields)
        except Exception:
            self.emit(cls, run, {})
            raise
        finally:
            self.runs.end(run)

    def during(
        self,
        cls: type[ev.BaseEvent],
        run_id: UUID,
        parent_run_id: UUID | None,
        fields: dict[str, Any],
    ) -> None:
        """Publish an event of a run that goes on (neither its start nor its end)."""
        self.emit(cls, self.runs.lookup(run_id, parent_run_id), fields)
