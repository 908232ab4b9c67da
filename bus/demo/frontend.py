"""The demo's frontend process: the regular frontend plus two demo routes.

``python -m bus.demo.frontend --port 8000`` serves everything ``lcbus serve``
does, and for the browser page:

- ``POST /demo/runs`` ``{"prompt": ...}``: starts the demo chain in this
  process (it acts as the app) with the bus handler, and answers at once with
  the run's ``trace_id`` and a stream token for it;
- ``GET /demo/deliveries``: the attempt log of the demo's webhook endpoint.

Configured by ``LCBUS_DEMO_OPENAI_URL`` (the model server; empty means the
real OpenAI API with ``OPENAI_API_KEY``) and ``LCBUS_DEMO_ENDPOINT_ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from typing import Any

import msgspec
import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bus.connect import async_client
from bus.demo.app import build_tool_chain, openai_model
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from bus.tokens import stream_token
from bus.webhooks.endpoints import Endpoints

MAX_PROMPT_CHARS = 2_000


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str


def demo_routes(
    settings: Settings, redis: aioredis.Redis, *, openai_url: str | None, endpoint_id: str
) -> list[BaseRoute]:
    handler = BusCallbackHandler(settings=settings)
    chain = build_tool_chain(
        openai_model(openai_url, api_key=os.environ.get("OPENAI_API_KEY", "local"))
    )
    endpoints = Endpoints(redis=redis, settings=settings)
    running: set[asyncio.Future[Any]] = set()

    async def start_run(request: Request) -> Response:
        try:
            body = msgspec.json.decode(await request.body(), type=RunRequest)
        except msgspec.DecodeError as exc:
            return JSONResponse({"error": f'expected {{"prompt": str}}: {exc}'}, status_code=400)
        prompt = body.prompt.strip()[:MAX_PROMPT_CHARS]
        if not prompt:
            return JSONResponse({"error": "the prompt is empty"}, status_code=400)
        run_id = uuid.uuid4()
        config: Any = {
            "callbacks": [handler],
            "run_id": run_id,
            "metadata": {"source": "demo-page"},
        }
        # The chain is sync (ChatOpenAI streaming over HTTP): run it off the event loop.
        future = asyncio.get_running_loop().run_in_executor(None, chain.invoke, prompt, config)
        running.add(future)
        future.add_done_callback(running.discard)
        token = stream_token(str(run_id), secret=settings.stream_secret)
        return JSONResponse({"trace_id": str(run_id), "token": token}, status_code=202)

    async def deliveries(request: Request) -> Response:
        if not endpoint_id:
            return JSONResponse([])
        attempts = await endpoints.attempts(endpoint_id, limit=100)
        return Response(msgspec.json.encode(attempts), media_type="application/json")

    return [
        Route("/demo/runs", start_run, methods=["POST"]),
        Route("/demo/deliveries", deliveries, methods=["GET"]),
    ]


def main() -> None:
    import uvicorn

    from bus.frontend import create_app

    parser = argparse.ArgumentParser(description="The demo's frontend process.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    settings = Settings.from_env()
    redis = async_client(settings)
    routes = demo_routes(
        settings,
        redis,
        openai_url=os.environ.get("LCBUS_DEMO_OPENAI_URL") or None,
        endpoint_id=os.environ.get("LCBUS_DEMO_ENDPOINT_ID", ""),
    )
    app = create_app(settings, redis=redis, extra_routes=routes)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
