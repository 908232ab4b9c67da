"""A webhook receiver for tests and the benchmark, run in its own process.

``python tests/support/webhook_receiver.py PORT`` serves:

- ``POST /hook/{name}``: records the request (headers, body, time) and
  answers as configured for ``name``: the next status from its list (the last
  one repeats; 200 when none), after sleeping ``sleep_s``, with
  ``Retry-After`` when ``retry_after`` is set;
- ``PUT /config/{name}`` with JSON ``{"statuses": [...], "sleep_s": 0,
  "retry_after": "2"}`` sets that behaviour;
- ``GET /received/{name}`` returns what was recorded, in arrival order;
- ``GET /health`` answers 200 once the server is up.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_config: dict[str, dict[str, Any]] = {}
_received: dict[str, list[dict[str, Any]]] = {}
_served: dict[str, int] = {}


async def hook(request: Request) -> Response:
    name = request.path_params["name"]
    body = await request.body()
    _received.setdefault(name, []).append(
        {"headers": dict(request.headers), "body": body.decode(), "at": time.time()}
    )
    config = _config.get(name, {})
    statuses: list[int] = config.get("statuses") or [200]
    index = _served.get(name, 0)
    _served[name] = index + 1
    status = statuses[min(index, len(statuses) - 1)]
    if config.get("sleep_s"):
        await asyncio.sleep(float(config["sleep_s"]))
    headers = {}
    if config.get("retry_after") is not None:
        headers["retry-after"] = str(config["retry_after"])
    return Response(f"status {status}", status_code=status, headers=headers)


async def configure(request: Request) -> Response:
    _config[request.path_params["name"]] = await request.json()
    return JSONResponse({"ok": True})


async def received(request: Request) -> Response:
    return JSONResponse(_received.get(request.path_params["name"], []))


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/hook/{name}", hook, methods=["POST"]),
        Route("/config/{name}", configure, methods=["PUT"]),
        Route("/received/{name}", received, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
