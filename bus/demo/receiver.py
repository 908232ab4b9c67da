"""The demo's webhook receiver: verifies every delivery with ``standardwebhooks``.

``python -m bus.demo.receiver --port 8090 --secret whsec_...`` serves
``POST /hook`` (verify, record, answer 204; 401 on a bad signature) and
``GET /deliveries`` (what arrived, with the verification result).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(secret: str) -> Starlette:
    verifier = Webhook(secret)
    deliveries: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        body = await request.body()
        record: dict[str, Any] = {
            "webhook_id": request.headers.get("webhook-id"),
            "at": time.time(),
        }
        try:
            payload = verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            deliveries.append({**record, "verified": False, "error": str(exc)})
            return JSONResponse({"error": "signature does not verify"}, status_code=401)
        deliveries.append(
            {**record, "verified": True, "type": payload.get("type"), "data": payload.get("data")}
        )
        return Response(status_code=204)

    async def listing(request: Request) -> Response:
        return JSONResponse(deliveries)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/hook", hook, methods=["POST"]),
            Route("/deliveries", listing),
            Route("/healthz", health),
        ]
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--secret", default=os.environ.get("LCBUS_DEMO_WEBHOOK_SECRET", ""))
    args = parser.parse_args()
    if not args.secret:
        parser.error("--secret (or LCBUS_DEMO_WEBHOOK_SECRET) is required")
    uvicorn.run(
        create_app(args.secret), host=args.host, port=args.port, log_level="info", access_log=False
    )


if __name__ == "__main__":
    main()
