"""``lcbus tail``: live events, readable, filtered by type or trace."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import redis

from bus.cli.tailing import RunNames, describe, event_filter, follow
from bus.errors import EventDecodeError
from bus.settings import Settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("tail", help="follow live events", description=__doc__)
    parser.add_argument(
        "--type",
        action="append",
        dest="types",
        metavar="TYPE",
        help="only events whose type starts with TYPE (repeatable), e.g. on_tool",
    )
    parser.add_argument("--trace", help="only events of this trace id")
    parser.add_argument("--from-start", action="store_true", help="replay retained events first")
    parser.add_argument("--limit", type=int, default=0, help="stop after N events (0 = never)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url)
    matches = event_filter(types=args.types, trace_id=args.trace)
    names = RunNames()
    shown = 0
    try:
        for item in follow(
            client, settings, from_start=args.from_start, block_ms=settings.read_block_ms
        ):
            if isinstance(item, EventDecodeError):
                print(f"undecodable: {item}", file=sys.stderr)
                continue
            name = names.of(item)
            if matches(item):
                print(describe(item, name), flush=True)
                shown += 1
                if args.limit and shown >= args.limit:
                    return 0
    except KeyboardInterrupt:
        return 0
    except redis.RedisError as exc:
        print(f"lcbus tail: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
