"""Which partition a trace's events go to (pure logic)."""

from __future__ import annotations

import uuid

from bus.keys import partition_of
from bus.producer.runs import RunRegistry

PARTITIONS = 8


def _run_on_other_partition_than(thread: str) -> uuid.UUID:
    """A root run id whose own partition differs from the thread's."""
    while True:
        run_id = uuid.uuid4()
        if partition_of(str(run_id), PARTITIONS) != partition_of(thread, PARTITIONS):
            return run_id


def test_every_trace_of_a_thread_goes_to_the_threads_partition() -> None:
    """Runs of one conversation share a partition, so one lease holder appends them in order."""
    registry = RunRegistry(PARTITIONS)
    thread = "conversation-7"
    for _ in range(5):
        run_id = _run_on_other_partition_than(thread)
        root = registry.start(
            run_id, None, name="agent", run_type="chain", tags=[], metadata={"thread_id": thread}
        )
        child = registry.start(
            uuid.uuid4(), run_id, name="model", run_type="chat_model", tags=[], metadata={}
        )
        assert root.trace.trace_id == str(run_id)
        assert root.trace.partition == child.trace.partition == partition_of(thread, PARTITIONS)


def test_a_trace_without_a_thread_goes_to_its_own_partition() -> None:
    registry = RunRegistry(PARTITIONS)
    run_id = uuid.uuid4()
    run = registry.start(run_id, None, name="chain", run_type="chain", tags=[], metadata={})
    assert run.trace.partition == partition_of(str(run_id), PARTITIONS)
    numbered = uuid.uuid4()
    meta = {"thread_id": 42}
    run = registry.start(numbered, None, name="chain", run_type="chain", tags=[], metadata=meta)
    assert run.trace.partition == partition_of("42", PARTITIONS)
