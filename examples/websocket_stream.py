"""A thread's tokens over the frontend's WebSocket, instead of an asyncio.Queue in the app."""

import asyncio
import json
import os
import uuid

import websockets
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from bus import BusCallbackHandler, Settings, thread_token

FRONTEND = os.environ.get("FRONTEND_URL", "http://127.0.0.1:8000").replace("http", "ws", 1)


async def run_chain(settings: Settings, thread_id: str) -> None:
    """The app: any process; runs of one conversation share a thread_id."""
    handler = BusCallbackHandler(settings=settings)
    model = GenericFakeChatModel(messages=iter([AIMessage(content="one socket per thread")]))
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    config = {"callbacks": [handler], "metadata": {"thread_id": thread_id}}
    async for _ in chain.astream({"q": "hi"}, config=config):
        pass
    handler.close()


async def main() -> None:
    settings = Settings.from_env()
    thread_id = f"thread-{uuid.uuid4().hex}"
    token = thread_token(thread_id, secret=settings.stream_secret)
    async with websockets.connect(f"{FRONTEND}/threads/{thread_id}/stream?token={token}") as ws:
        subscribe = {"channels": ["messages"]}
        await ws.send(
            json.dumps({"id": 1, "method": "subscription.subscribe", "params": subscribe})
        )
        assert json.loads(await ws.recv())["type"] == "success"
        run = asyncio.create_task(run_chain(settings, thread_id))
        text = ""
        async for frame in ws:
            data = json.loads(frame)["params"]["data"]
            if data.get("event") == "content-block-delta" and data["delta"]["type"] == "text-delta":
                text += data["delta"]["text"]
            if data.get("event") == "message-finish":  # the model's answer is complete
                break
        await run
    print(text)


asyncio.run(main())
