"""``lcbus token``: print a stream token for one trace or thread."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bus.errors import AccessError
from bus.settings import Settings
from bus.tokens import DEFAULT_TTL_S, stream_token, thread_token


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("token", help="print a stream token (needs LCBUS_STREAM_SECRET)")
    parser.add_argument("id", metavar="TRACE_ID", help="the trace id (or thread id with --thread)")
    parser.add_argument("--thread", action="store_true", help="scope the token to a thread")
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="lifetime in seconds")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    secret = Settings.from_env().stream_secret
    issue = thread_token if args.thread else stream_token
    try:
        print(issue(args.id, secret=secret, ttl_s=args.ttl))
    except AccessError as exc:
        print(f"lcbus token: {exc}", file=sys.stderr)
        return 2
    return 0
