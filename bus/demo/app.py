"""The demo's LangChain app: retriever, prompt, streaming chat model, tool."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun, dispatch_custom_event
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnablePassthrough
from langchain_core.tools import tool

ANSWER = (
    "Every token of this answer left the app process as a callback, crossed Redis "
    "Streams, and reached you through a worker and a streaming frontend."
)

DOCUMENTS = {
    "redis": "Redis Streams keep an ordered, replayable log of entries per key.",
    "langchain": "LangChain callbacks fire for every model, chain, tool and retriever step.",
}


class NotesRetriever(BaseRetriever):
    """Finds the notes whose topic appears in the query."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        hits = [text for topic, text in DOCUMENTS.items() if topic in query.lower()]
        return [Document(page_content=text, metadata={"source": "notes"}) for text in hits]


@tool
def word_count(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


def _note_progress(inputs: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
    dispatch_custom_event(
        "retrieval_done", {"documents": inputs["context"].count("\n") + 1}, config=config
    )
    return inputs


def _join(docs: list[Document]) -> str:
    return "\n".join(d.page_content for d in docs)


def fake_model(answer: str = ANSWER) -> BaseChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(answer)] * 1000))


def build_chain(model: BaseChatModel) -> Runnable[str, dict[str, Any]]:
    """retriever -> custom event -> prompt | model | parser -> word-count tool."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer using these notes:\n{context}"), ("human", "{question}")]
    )
    return (
        {"context": NotesRetriever() | _join, "question": RunnablePassthrough()}
        | RunnableLambda(_note_progress)
        | prompt
        | model
        | StrOutputParser()
        | {"answer": RunnablePassthrough(), "words": word_count}
    )


def openai_model(
    base_url: str | None, *, api_key: str = "local", model: str = "gpt-4o-mini"
) -> BaseChatModel:
    """``ChatOpenAI`` streaming with usage; ``base_url=None`` means the real API."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=model,
        base_url=base_url,
        api_key=api_key,  # type: ignore[arg-type]
        streaming=True,
        stream_usage=True,
        max_retries=0,
        timeout=30,
    )


def build_tool_chain(model: BaseChatModel) -> Runnable[str, str]:
    """retriever -> custom event -> prompt -> model with a tool -> tool -> model again."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer using these notes:\n{context}"), ("human", "{question}")]
    )
    tools = {"word_count": word_count}
    bound = model.bind_tools([word_count])

    def respond(prompt_value: PromptValue, config: RunnableConfig) -> str:
        history: list[BaseMessage] = prompt_value.to_messages()
        reply = bound.invoke(history, config)
        history.append(reply)
        for call in getattr(reply, "tool_calls", []):
            history.append(tools[call["name"]].invoke(call, config))
        if getattr(reply, "tool_calls", None):
            reply = bound.invoke(history, config)
        return str(reply.content)

    return (
        {"context": NotesRetriever() | _join, "question": RunnablePassthrough()}
        | RunnableLambda(_note_progress)
        | prompt
        | RunnableLambda(respond, name="respond")
    )
