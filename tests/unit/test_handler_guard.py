"""No exception of the handler reaches the app: each is counted and logged once per kind."""

from __future__ import annotations

import logging
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from langchain_core.agents import AgentAction, AgentFinish
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage
from langchain_core.outputs import Generation, LLMResult

from bus import BusCallbackHandler, Settings
from bus import events as ev
from tests.support.chains import ANSWER, build_chain

HANDLER_LOGGER = "bus.producer.callbacks"

# Positional and keyword arguments (besides run_id) for every callback the handler implements.
CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "on_llm_start": (({"name": "llm"}, ["hi"]), {"tags": ["t"], "metadata": {"k": 1}}),
    "on_chat_model_start": (({"name": "chat"}, [[HumanMessage("hi")]]), {"tags": ["t"]}),
    "on_llm_new_token": (("tok",), {"chunk": None}),
    "on_stream_event": (({"delta": "x"},), {}),
    "on_llm_end": ((LLMResult(generations=[[Generation(text="done")]]),), {}),
    "on_llm_error": ((ValueError("model failed"),), {}),
    "on_chain_start": (({"name": "chain"}, {"q": 1}), {"metadata": {"k": 1}}),
    "on_chain_end": (({"a": 1},), {}),
    "on_chain_error": ((ValueError("chain failed"),), {}),
    "on_tool_start": (({"name": "tool"}, "in"), {"inputs": {"x": 1}, "tool_call_id": "c1"}),
    "on_tool_end": (("out",), {}),
    "on_tool_error": ((ValueError("tool failed"),), {}),
    "on_retriever_start": (({"name": "kb"}, "query"), {}),
    "on_retriever_end": (([Document(page_content="doc")],), {}),
    "on_retriever_error": ((ValueError("retriever failed"),), {}),
    "on_agent_action": ((AgentAction(tool="t", tool_input="i", log="l"),), {}),
    "on_agent_finish": ((AgentFinish(return_values={"o": 1}, log="l"),), {}),
    "on_text": (("some text",), {}),
    "on_retry": ((SimpleNamespace(attempt_number=2, outcome=None),), {}),
    "on_custom_event": (("progress", {"step": 1}), {}),
}


class RecordingPublisher:
    """Stands in for the publisher: keeps what is published, or raises ``failure``."""

    def __init__(self) -> None:
        self.settings = Settings(prefix="lcbus-unit", partitions=4)
        self.source = "unit"
        self.published: list[bytes] = []
        self.failure: Exception | None = None

    def publish(self, partition: int, payload: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        self.published.append(payload)


def handler_with(publisher: RecordingPublisher) -> BusCallbackHandler:
    return BusCallbackHandler(publisher=publisher)  # type: ignore[arg-type]


def call(handler: BusCallbackHandler, name: str, run_id: uuid.UUID) -> None:
    args, kwargs = CALLS[name]
    getattr(handler, name)(*args, run_id=run_id, parent_run_id=None, **kwargs)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == HANDLER_LOGGER]


def test_the_table_names_every_callback_the_handler_implements() -> None:
    implemented = {
        name
        for name in dir(BusCallbackHandler)
        if name.startswith("on_")
        and getattr(BusCallbackHandler, name) is not getattr(BaseCallbackHandler, name, None)
    }
    assert implemented == set(CALLS)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_working_publisher_gets_the_callbacks_event(name: str) -> None:
    publisher = RecordingPublisher()
    handler = handler_with(publisher)
    run_id = uuid.uuid4()
    call(handler, name, run_id)
    [payload] = publisher.published
    event = ev.decode(payload)
    assert (ev.event_type(event), event.run_id, event.trace_id) == (name, str(run_id), str(run_id))
    assert handler.failures == 0


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_failure_is_swallowed_counted_and_logged_once_per_kind(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=HANDLER_LOGGER)
    publisher = RecordingPublisher()
    handler = handler_with(publisher)
    publisher.failure = RuntimeError("redis is gone")
    for _ in range(3):
        call(handler, name, uuid.uuid4())
    assert handler.failures == 3
    first = f"lcbus handler could not publish {name}: RuntimeError('redis is gone')"
    assert warnings_of(caplog) == [first]

    publisher.failure = ConnectionError("refused")
    call(handler, name, uuid.uuid4())
    call(handler, name, uuid.uuid4())
    assert handler.failures == 5
    second = f"lcbus handler could not publish {name}: ConnectionError('refused')"
    assert warnings_of(caplog) == [first, second]
    assert publisher.published == []


def test_the_guard_lets_an_interrupt_through() -> None:
    publisher = RecordingPublisher()
    handler = handler_with(publisher)
    publisher.failure = KeyboardInterrupt()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        call(handler, "on_chain_start", uuid.uuid4())
    assert handler.failures == 0


class CallbackCounter(BaseCallbackHandler):
    """Counts the callbacks LangChain delivers, for the ones the bus handler implements."""

    run_inline = True

    def __init__(self) -> None:
        self.calls: list[str] = []


def _counting(name: str) -> Any:
    def callback(self: CallbackCounter, *args: Any, **kwargs: Any) -> None:
        self.calls.append(name)

    return callback


for _name in CALLS:
    setattr(CallbackCounter, _name, _counting(_name))


def expected_warnings(calls: list[str]) -> list[str]:
    """One warning per callback kind, in the order the kinds first failed."""
    kinds = dict.fromkeys(calls)
    return [f"lcbus handler could not publish {n}: RuntimeError('redis is gone')" for n in kinds]


def _failing_handler_and_counter() -> tuple[BusCallbackHandler, CallbackCounter]:
    publisher = RecordingPublisher()
    publisher.failure = RuntimeError("redis is gone")
    return handler_with(publisher), CallbackCounter()


def test_a_chain_completes_when_publishing_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    handler, counter = _failing_handler_and_counter()
    result = build_chain().invoke("what moves tokens?", config={"callbacks": [handler, counter]})
    assert result == {"answer": ANSWER, "words": len(ANSWER.split())}
    assert {"on_chain_start", "on_chat_model_start", "on_tool_end"} <= set(counter.calls)
    assert handler.failures == len(counter.calls)
    # Nothing reached LangChain's own handling of callback errors: only ours logged.
    assert [r.name for r in caplog.records] == [HANDLER_LOGGER] * len(set(counter.calls))
    assert warnings_of(caplog) == expected_warnings(counter.calls)


async def test_an_async_stream_completes_when_publishing_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    handler, counter = _failing_handler_and_counter()
    chunks = [
        chunk
        async for chunk in build_chain().astream(
            "what moves tokens?", config={"callbacks": [handler, counter]}
        )
    ]
    answer = "".join(chunk.get("answer", "") for chunk in chunks)
    assert answer == ANSWER
    assert [chunk["words"] for chunk in chunks if "words" in chunk] == [len(ANSWER.split())]
    assert counter.calls.count("on_llm_new_token") > 1
    assert handler.failures == len(counter.calls)
    assert [r.name for r in caplog.records] == [HANDLER_LOGGER] * len(set(counter.calls))
    assert warnings_of(caplog) == expected_warnings(counter.calls)
