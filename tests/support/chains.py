"""A small LangChain app that exercises every kind of run the handler sees."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.documents import Document
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnablePassthrough
from langchain_core.tools import tool

ANSWER = "Redis streams carry every token to every browser"


class KnowledgeBase(BaseRetriever):
    """Returns one document about the query."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [Document(page_content=f"notes about {query}", metadata={"source": "kb"})]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        return self._get_relevant_documents(query, run_manager=run_manager.get_sync())


@tool
def word_count(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


@tool
def always_fails(text: str) -> str:
    """A tool that fails."""
    raise ValueError(f"cannot handle {text!r}")


def _announce(inputs: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
    dispatch_custom_event("progress", {"step": "retrieved"}, config=config)
    return inputs


async def _aannounce(inputs: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
    await adispatch_custom_event("progress", {"step": "retrieved"}, config=config)
    return inputs


def _join_docs(docs: list[Document]) -> str:
    return "\n".join(d.page_content for d in docs)


def build_chain(*, answer: str = ANSWER, failing_tool: bool = False) -> Runnable[str, Any]:
    """retriever -> custom event -> prompt | chat model | parser -> tool."""
    model = GenericFakeChatModel(messages=iter([AIMessage(answer)] * 100))
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Context: {context}"), ("human", "{question}")]
    )
    final_tool = always_fails if failing_tool else word_count
    return (
        {"context": KnowledgeBase() | _join_docs, "question": RunnablePassthrough()}
        | RunnableLambda(_announce, afunc=_aannounce)
        | prompt
        | model
        | StrOutputParser()
        | {"answer": RunnablePassthrough(), "words": final_tool}
    )
