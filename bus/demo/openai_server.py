"""A local OpenAI-compatible chat completions server with a scripted answer.

It lets the demo and the tests run ``langchain-openai``'s ``ChatOpenAI`` for
real (HTTP, SSE streaming, tool calls, usage) with no API key and no network.
The script: when the conversation has no tool result yet and tools are offered,
the model streams a call of the first tool; otherwise it streams the answer,
word by word, then a usage chunk when ``stream_options.include_usage`` is set.

Run it alone with ``python -m bus.demo.openai_server --port 8089``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DEFAULT_ANSWER = (
    "Redis Streams carried each of these tokens from the app to a fan-out worker, "
    "which published them for every streaming frontend to deliver."
)
TOKEN_DELAY_S = 0.01


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _tool_call_arguments(tool: dict[str, Any], messages: list[dict[str, Any]]) -> str:
    """Arguments for the scripted tool call: the user's question for every string parameter."""
    question = next((str(m.get("content", "")) for m in messages if m.get("role") == "user"), "")
    properties = tool.get("function", {}).get("parameters", {}).get("properties", {})
    return json.dumps({name: question for name in properties} or {"input": question})


class ScriptedModel:
    """Produces the chunks of one completion."""

    def __init__(self, answer: str, delay_s: float) -> None:
        self.answer = answer
        self.delay_s = delay_s

    def wants_tool(self, body: dict[str, Any]) -> bool:
        messages = body.get("messages", [])
        return bool(body.get("tools")) and not any(m.get("role") == "tool" for m in messages)

    async def chunks(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "scripted"),
        }
        if self.wants_tool(body):
            tool = body["tools"][0]
            call = {
                "index": 0,
                "id": f"call_{uuid.uuid4().hex[:8]}",
                "type": "function",
                "function": {"name": tool["function"]["name"], "arguments": ""},
            }
            yield {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "tool_calls": [call]},
                        "finish_reason": None,
                    }
                ],
            }
            arguments = _tool_call_arguments(tool, body.get("messages", []))
            for start in range(0, len(arguments), 8):
                part = {"index": 0, "function": {"arguments": arguments[start : start + 8]}}
                yield {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"tool_calls": [part]}, "finish_reason": None}
                    ],
                }
                await asyncio.sleep(self.delay_s)
            finish, completion_tokens = "tool_calls", 12
        else:
            yield {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
            words = _words(self.answer)
            for word in words:
                yield {
                    **base,
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                await asyncio.sleep(self.delay_s)
            finish, completion_tokens = "stop", len(words)
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        if body.get("stream_options", {}).get("include_usage"):
            prompt_tokens = sum(
                len(str(m.get("content", "")).split()) for m in body.get("messages", [])
            )
            yield {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }


def create_app(*, answer: str = DEFAULT_ANSWER, delay_s: float = TOKEN_DELAY_S) -> Starlette:
    model = ScriptedModel(answer, delay_s)

    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return JSONResponse({"error": {"message": "body is not JSON"}}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return JSONResponse({"error": {"message": "messages must be a list"}}, status_code=400)
        if body.get("stream"):

            async def frames() -> AsyncIterator[str]:
                async for chunk in model.chunks(body):
                    yield json.dumps(chunk)
                yield "[DONE]"

            return EventSourceResponse(frames(), ping=None)
        return JSONResponse(await _collect(model, body))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/healthz", health),
        ]
    )


async def _collect(model: ScriptedModel, body: dict[str, Any]) -> dict[str, Any]:
    """A non-streaming completion assembled from the same chunks."""
    content, calls, usage, finish = "", [], None, "stop"
    async for chunk in model.chunks(body):
        usage = chunk.get("usage", usage)
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for part in delta.get("tool_calls", []):
                if "id" in part:
                    calls.append(
                        {
                            "id": part["id"],
                            "type": "function",
                            "function": {"name": part["function"]["name"], "arguments": ""},
                        }
                    )
                calls[-1]["function"]["arguments"] += part["function"].get("arguments", "")
            finish = choice.get("finish_reason") or finish
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--delay", type=float, default=TOKEN_DELAY_S, help="seconds between tokens")
    args = parser.parse_args()
    app = create_app(delay_s=args.delay)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
