"""A LangGraph ReAct agent for the SDK tests: a subgraph, a model that calls a tool, a tool.

``agent``: START -> ``research`` (the ``researcher`` subgraph, one model call)
-> ``model`` (calls ``word_count``) -> ``tools`` -> ``model`` (answers) -> END.
The models are langchain-core's fake chat model, streaming word by word;
the root model's answer can wait on an ``asyncio.Event`` half-way through, so a
test can act while the run is mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, adispatch_custom_event
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition

NOTES = "Redis streams keep every event in order"
ANSWER = "The research notes have seven words, so every token made it across"
TOOL_INPUT = {"text": NOTES}
TOOL_CALL_ID = "call_count_1"


@tool
def word_count(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


class PacedChatModel(GenericFakeChatModel):
    """Streams each reply word by word (tool calls as chunks); may wait at word ``hold_at``."""

    streaming: bool = False
    """Passed as True: langchain-core then streams even under ``ainvoke``."""
    hold: Any = None
    """An ``asyncio.Event`` the answer waits on before word ``hold_at`` (None: no wait)."""
    hold_at: int = 0

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        reply = next(self.messages)
        message = AIMessage(reply) if isinstance(reply, str) else reply
        words = [w for w in re.split(r"(\s)", str(message.content)) if w]
        for index, word in enumerate(words):
            if self.hold is not None and index == self.hold_at and message.content:
                await self.hold.wait()
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
            if run_manager:
                await run_manager.on_llm_new_token(word, chunk=chunk)
            yield chunk
            await asyncio.sleep(0.005)
        for index, call in enumerate(message.tool_calls):
            part = {"name": call["name"], "args": json.dumps(call["args"]), "id": call["id"]}
            chunk_message = AIMessageChunk(content="", tool_call_chunks=[{**part, "index": index}])
            chunk = ChatGenerationChunk(message=chunk_message)
            if run_manager:
                await run_manager.on_llm_new_token("", chunk=chunk)
            yield chunk


def build_agent(hold: asyncio.Event | None = None) -> CompiledStateGraph[Any, Any, Any, Any]:
    researcher_model = PacedChatModel(messages=iter([NOTES]), streaming=True)
    call = {"name": "word_count", "args": TOOL_INPUT, "id": TOOL_CALL_ID}
    replies = iter([AIMessage("", tool_calls=[call]), AIMessage(ANSWER)])
    model = PacedChatModel(messages=replies, streaming=True, hold=hold, hold_at=4)

    async def research(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        reply = await researcher_model.ainvoke(state["messages"], config)
        await adispatch_custom_event("progress", {"step": "researched"}, config=config)
        return {"messages": [reply]}

    sub = StateGraph(MessagesState)
    sub.add_node("research", research)
    sub.add_edge(START, "research")
    sub.add_edge("research", END)

    async def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"], config)]}

    graph = StateGraph(MessagesState)
    graph.add_node("research", sub.compile(name="researcher"))
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode([word_count]))
    graph.add_edge(START, "research")
    graph.add_edge("research", "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile(name="agent")
