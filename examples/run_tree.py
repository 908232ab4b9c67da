"""The run tree of a finished run, read from any process (the trace worker built it)."""

import asyncio
import uuid

import redis.asyncio as aioredis
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from bus import BusCallbackHandler, Settings, get_trace


async def main() -> None:
    settings = Settings.from_env()
    handler = BusCallbackHandler(settings=settings)
    model = GenericFakeChatModel(messages=iter([AIMessage(content="hi there")]))
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    run_id = uuid.uuid4()
    await chain.ainvoke({"q": "hi"}, config={"callbacks": [handler], "run_id": run_id})
    handler.close()  # flushes what is buffered

    client = aioredis.Redis.from_url(settings.redis_url)
    for _ in range(200):  # the trace worker completes the tree within milliseconds
        trace = await get_trace(client, settings, str(run_id))
        if trace is not None and trace.completed and trace.root is not None:
            print(trace.status, [(run.name, run.run_type) for run in trace.root.children])
            break
        await asyncio.sleep(0.05)
    await client.aclose()


asyncio.run(main())
