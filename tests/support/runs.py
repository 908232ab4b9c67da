"""LangChain runs traced twice: by the bus handler and by langchain-core's own tracer.

``run_scenario`` executes one trace (a nested chain with a streaming chat model,
a tool, a retriever, a failing branch that is caught, optionally a failing root)
with both a :class:`BusCallbackHandler` and :class:`Recorder` attached, and
returns the recorder's root run. ``assert_same_tree`` compares a bus tree with
it field by field.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run

from bus.traces.tree import RunNode, _stamp


class Recorder(BaseTracer):
    """langchain-core's tracer in its default format (the one LangSmith records:
    a chat model's run is an ``llm`` run), keeping finished root runs in memory."""

    run_inline = True

    def __init__(self) -> None:
        super().__init__()
        self.roots: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        self.roots.append(run)


class Docs(BaseRetriever):
    def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return [Document(page_content=f"about {query}", metadata={"n": 1})]


@tool
def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()


def _boom(_: Any) -> str:
    raise ValueError("branch failed on purpose")


def _model() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content="streamed answer words")]))


def _chain() -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{q}")])
    return prompt | _model() | StrOutputParser()


def _steps(x: dict[str, Any], config: RunnableConfig) -> str:
    text = "".join(_chain().stream(x, config))
    docs = Docs().invoke(text, config)
    shouted = shout.invoke({"text": docs[0].page_content}, config)
    with contextlib.suppress(ValueError):
        RunnableLambda(_boom, name="failing_branch").invoke(x, config)
    if x.get("fail"):
        raise RuntimeError("root gives up")
    return str(shouted)


async def _asteps(x: dict[str, Any], config: RunnableConfig) -> str:
    text = "".join([chunk async for chunk in _chain().astream(x, config)])
    docs = await Docs().ainvoke(text, config)
    shouted = await shout.ainvoke({"text": docs[0].page_content}, config)
    with contextlib.suppress(ValueError):
        await RunnableLambda(_boom, name="failing_branch").ainvoke(x, config)
    if x.get("fail"):
        raise RuntimeError("root gives up")
    return str(shouted)


def run_scenario(handler: BaseCallbackHandler, *, fail: bool = False) -> Run:
    recorder = Recorder()
    config: RunnableConfig = {
        "callbacks": [recorder, handler],
        "tags": ["scenario"],
        "metadata": {"user": "u1"},
        "run_id": uuid.uuid4(),
    }
    root = RunnableLambda(_steps, name="pipeline")
    try:
        root.invoke({"q": "hi", "fail": fail}, config)
    except RuntimeError:
        assert fail
    return _only_root(recorder)


async def arun_scenario(handler: BaseCallbackHandler, *, fail: bool = False) -> Run:
    recorder = Recorder()
    config: RunnableConfig = {
        "callbacks": [recorder, handler],
        "tags": ["scenario"],
        "metadata": {"user": "u1"},
        "run_id": uuid.uuid4(),
    }
    root = RunnableLambda(_steps, afunc=_asteps, name="pipeline")
    try:
        await root.ainvoke({"q": "hi", "fail": fail}, config)
    except RuntimeError:
        assert fail
    return _only_root(recorder)


def _only_root(recorder: Recorder) -> Run:
    assert len(recorder.roots) == 1, recorder.roots
    return recorder.roots[0]


def count_runs(run: Run) -> int:
    return 1 + sum(count_runs(child) for child in run.child_runs)


def assert_same_tree(expected: Run, node: RunNode, path: str = "") -> None:
    """The bus's node equals the tracer's run: ids, parents, names, types, order, errors."""
    where = f"{path}/{expected.name}"
    assert node.id == str(expected.id), where
    assert node.trace_id == str(expected.trace_id), where
    assert node.parent_run_id == (str(expected.parent_run_id) if expected.parent_run_id else None)
    assert node.name == expected.name, where
    assert node.run_type == expected.run_type, where
    model_type = expected.metadata.get("ls_model_type") if expected.run_type == "llm" else None
    assert node.model_type == model_type, where
    assert node.tags == (expected.tags or []), where
    assert node.metadata == expected.metadata, where
    # dotted_order: the same chain of run ids; each stamp is that run's own start time
    # (the tracer and the handler each read the clock themselves).
    assert _ids(node.dotted_order) == _ids(str(expected.dotted_order)), where
    assert node.dotted_order.endswith(_stamp(node.start_time) + node.id), where
    if expected.error:
        # The tracer keeps repr + traceback; its last line is "ExcType: message".
        assert node.status == "error", where
        assert node.error == expected.error.strip().splitlines()[-1], where
        assert node.error_type == expected.error.split("(", 1)[0], where
    else:
        assert node.status == "success", where
        assert node.error is None, where
    tokens = [e for e in expected.events if e["name"] == "new_token"]
    assert node.token_count == len(tokens), where
    assert (node.first_token_time is not None) == bool(tokens), where
    assert [c.id for c in node.children] == [str(c.id) for c in expected.child_runs], where
    for child_run, child_node in zip(expected.child_runs, node.children, strict=True):
        assert_same_tree(child_run, child_node, where)


def _ids(dotted: str) -> list[str]:
    return [part[-36:] for part in dotted.split(".")]
