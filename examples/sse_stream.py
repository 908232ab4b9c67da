"""A run's tokens over SSE from the frontend, while the run goes on (here in the same script)."""

import asyncio
import json
import os
import uuid

import httpx
from httpx_sse import aconnect_sse
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from bus import BusCallbackHandler, Settings, stream_token

FRONTEND = os.environ.get("FRONTEND_URL", "http://127.0.0.1:8000")


async def run_chain(settings: Settings, run_id: uuid.UUID) -> None:
    """The app: any process, with the handler attached."""
    handler = BusCallbackHandler(settings=settings)
    model = GenericFakeChatModel(messages=iter([AIMessage(content="streamed over the bus")]))
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    async for _ in chain.astream({"q": "hi"}, config={"callbacks": [handler], "run_id": run_id}):
        pass
    handler.close()


async def read_stream(settings: Settings, run_id: uuid.UUID) -> str:
    """The client (a browser's EventSource works the same): text deltas until the end."""
    token = stream_token(str(run_id), secret=settings.stream_secret)
    url = f"{FRONTEND}/traces/{run_id}/stream"
    text = ""
    async with (
        httpx.AsyncClient(timeout=30) as http,
        aconnect_sse(http, "GET", url, params={"token": token}) as source,
    ):
        async for message in source.aiter_sse():
            if message.event == "end":  # the trace finished
                break
            if not message.data:
                continue
            data = json.loads(message.data)["params"]["data"]
            if data.get("event") == "content-block-delta" and data["delta"]["type"] == "text-delta":
                text += data["delta"]["text"]
    return text


async def main() -> None:
    settings = Settings.from_env()
    run_id = uuid.uuid4()  # chosen up front, so the client can connect before the run starts
    reader = asyncio.create_task(read_stream(settings, run_id))
    await run_chain(settings, run_id)
    print(await reader)


asyncio.run(main())
