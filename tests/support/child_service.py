"""A child service for the cross-process trace test: its own chain, in the caller's trace.

``python -m tests.support.child_service PORT`` serves ``POST /shout`` (``{"text": ...}``):
it continues the caller's trace from the request's headers (``bus.continue_trace``),
runs prompt | fake chat model | parser on the text through a
:class:`BusCallbackHandler` built from the environment, and answers ``{"answer": ...}``.
"""

from __future__ import annotations

import sys

import uvicorn
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bus import BusCallbackHandler, Settings, TraceContextError, continue_trace

handler = BusCallbackHandler(settings=Settings.from_env())


async def shout(request: Request) -> JSONResponse:
    text = str((await request.json())["text"])
    model = GenericFakeChatModel(messages=iter([AIMessage(content=text.upper())]))
    chain = ChatPromptTemplate.from_messages([("human", "{text}")]) | model | StrOutputParser()
    try:
        continued = continue_trace(request.headers, handler)
    except TraceContextError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    async with continued as config:
        answer = await chain.with_config(run_name="child_pipeline").ainvoke({"text": text}, config)
    return JSONResponse({"answer": answer})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/shout", shout, methods=["POST"]), Route("/healthz", health)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
