"""A signed webhook for every model answer: register the endpoint once, attach the handler."""

import asyncio
import os

import redis.asyncio as aioredis
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from bus import BusCallbackHandler, Endpoints, Settings


async def main() -> None:
    settings = Settings.from_env()
    client = aioredis.Redis.from_url(settings.redis_url)
    # Once, at deploy time (or: lcbus webhooks add URL --event llm.end):
    endpoint = await Endpoints(redis=client, settings=settings).add(
        os.environ["WEBHOOK_URL"], events=["llm.end"]
    )
    await client.aclose()
    print(endpoint.id)  # the secret to verify signatures with: lcbus webhooks show ID

    handler = BusCallbackHandler(settings=settings)
    model = GenericFakeChatModel(messages=iter([AIMessage(content="hi there")]))
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    await chain.ainvoke({"q": "hi"}, config={"callbacks": [handler]})
    handler.close()  # the webhook worker POSTs llm.end, signed, with retries


asyncio.run(main())
