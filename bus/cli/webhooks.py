"""``lcbus webhooks``: manage webhook endpoints, read attempts, replay dead letters."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from bus.errors import BusError
from bus.parsing import key_values
from bus.settings import Settings
from bus.webhooks.endpoints import Endpoints

Action = Callable[[Endpoints, argparse.Namespace], Awaitable[Any]]


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


async def _add(reg: Endpoints, args: argparse.Namespace) -> Any:
    metadata = key_values(args.metadata, option="--metadata")
    endpoint = await reg.add(
        args.url,
        events=args.event or ["*"],
        tags=args.tag,
        metadata=metadata,
        secret=args.secret,
        rate_limit=args.rate_limit,
        max_concurrency=args.max_concurrency,
        description=args.description,
    )
    return endpoint.to_dict()


async def _list(reg: Endpoints, args: argparse.Namespace) -> Any:
    return [e.to_dict(with_secrets=False) for e in await reg.all()]


async def _show(reg: Endpoints, args: argparse.Namespace) -> Any:
    return (await reg.get(args.id)).to_dict()


async def _remove(reg: Endpoints, args: argparse.Namespace) -> Any:
    await reg.remove(args.id)
    return {"removed": args.id}


async def _enable(reg: Endpoints, args: argparse.Namespace) -> Any:
    await reg.enable(args.id)
    return (await reg.get(args.id)).to_dict(with_secrets=False)


async def _disable(reg: Endpoints, args: argparse.Namespace) -> Any:
    await reg.disable(args.id, args.reason)
    return (await reg.get(args.id)).to_dict(with_secrets=False)


async def _rotate(reg: Endpoints, args: argparse.Namespace) -> Any:
    return (await reg.rotate_secret(args.id, secret=args.secret, grace_s=args.grace)).to_dict()


async def _attempts(reg: Endpoints, args: argparse.Namespace) -> Any:
    await reg.get(args.id)
    return [msgspec.to_builtins(a) for a in await reg.attempts(args.id, limit=args.limit)]


async def _replay(reg: Endpoints, args: argparse.Namespace) -> Any:
    # The registry's connection pool serves arq's enqueue too (closed with it).
    # Imported here: the rest of the CLI runs on the base install, without arq.
    from arq.connections import ArqRedis

    from bus.webhooks.outbox import replay, replay_since

    arq = ArqRedis(connection_pool=reg.redis.connection_pool)
    if args.message:
        count = await replay(reg.redis, arq, reg.settings, args.message)
    else:
        count = await replay_since(reg.redis, arq, reg.settings, _since(args.since))
    return {"replayed": count}


def _since(value: str) -> float:
    """Unix seconds, or a duration back from now such as 30m, 2h, 1d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1:] in units:
            return time.time() - float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError as exc:
        raise BusError(f"--since takes Unix seconds or a duration like 2h, got {value!r}") from exc


def _runner(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def go() -> Any:
            settings = Settings.from_env()
            client = aioredis.Redis.from_url(settings.redis_url)
            try:
                return await action(Endpoints(redis=client, settings=settings), args)
            finally:
                await client.aclose()

        try:
            _print(asyncio.run(go()))
        except BusError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    return run


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("webhooks", help="manage webhook endpoints", description=__doc__)
    sub = parser.add_subparsers(dest="webhooks_command", metavar="ACTION")
    sub.required = True

    add = sub.add_parser("add", help="register an endpoint (its URL must pass the SSRF guard)")
    add.add_argument("url")
    add.add_argument(
        "--event", action="append", help="type filter: chain.end, llm.*, * (repeatable)"
    )
    add.add_argument("--tag", action="append", default=[], help="event must carry one of these")
    add.add_argument("--metadata", action="append", default=[], help="KEY=VALUE the event has")
    add.add_argument("--secret", help="whsec_... (generated when not given)")
    add.add_argument("--rate-limit", type=int, default=0, help="deliveries/s, 0 = unlimited")
    add.add_argument("--max-concurrency", type=int, default=10)
    add.add_argument("--description", default="")
    add.set_defaults(run=_runner(_add))

    sub.add_parser("list", help="list endpoints (secrets shortened)").set_defaults(
        run=_runner(_list)
    )
    for name, helptext, action in (
        ("show", "show one endpoint with its secrets", _show),
        ("remove", "remove an endpoint and its attempt log", _remove),
        ("enable", "enable an endpoint and forget its failure streak", _enable),
    ):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("id")
        cmd.set_defaults(run=_runner(action))

    disable = sub.add_parser("disable", help="stop deliveries to an endpoint")
    disable.add_argument("id")
    disable.add_argument("--reason", default="disabled by an operator")
    disable.set_defaults(run=_runner(_disable))

    rotate = sub.add_parser("rotate-secret", help="add a new secret; old ones sign for a while")
    rotate.add_argument("id")
    rotate.add_argument("--secret", help="whsec_... (generated when not given)")
    rotate.add_argument("--grace", type=float, help="seconds the old secrets keep signing")
    rotate.set_defaults(run=_runner(_rotate))

    attempts = sub.add_parser("attempts", help="an endpoint's latest delivery attempts")
    attempts.add_argument("id")
    attempts.add_argument("--limit", type=int, default=20)
    attempts.set_defaults(run=_runner(_attempts))

    rep = sub.add_parser("replay", help="send dead-lettered messages again")
    which = rep.add_mutually_exclusive_group(required=True)
    which.add_argument("--message", help="one message id (msg_...)")
    which.add_argument("--since", help="every failure since: Unix seconds or 30m, 2h, 1d")
    rep.set_defaults(run=_runner(_replay))
