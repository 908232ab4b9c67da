"""``lcbus dlq list|replay GROUP``: inspect and re-inject dead letters."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from bus.connect import async_client
from bus.runtime import deadletter
from bus.settings import Settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("dlq", help="inspect and replay a group's dead letters")
    commands = parser.add_subparsers(dest="dlq_command", metavar="ACTION")
    commands.required = True
    listing = commands.add_parser("list", help="list the dead letters of GROUP")
    listing.add_argument("group")
    listing.add_argument("--count", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(run=run_list)
    replay = commands.add_parser("replay", help="put dead letters back on their partition")
    replay.add_argument("group")
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (default: all)")
    replay.set_defaults(run=run_replay)


async def _list(settings: Settings, group: str, count: int) -> list[deadletter.DeadLetter]:
    client = async_client(settings)
    try:
        return await deadletter.list_dead_letters(client, settings, group, count=count)
    finally:
        await client.aclose()


async def _replay(settings: Settings, group: str, ids: list[str]) -> list[str]:
    client = async_client(settings)
    try:
        return await deadletter.replay(client, settings, group, ids)
    finally:
        await client.aclose()


def run_list(args: argparse.Namespace) -> int:
    letters = asyncio.run(_list(Settings.from_env(), args.group, args.count))
    for letter in letters:
        if args.json:
            print(json.dumps(letter.to_dict()))
        else:
            print(
                f"{letter.id}  p{letter.partition} {letter.entry_id}  {letter.reason}: "
                f"{letter.error}"
            )
    if not letters and not args.json:
        print(f"no dead letters for group {args.group}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    replayed = asyncio.run(_replay(Settings.from_env(), args.group, args.ids))
    print(f"replayed {len(replayed)} dead letter(s)")
    missing = set(args.ids) - set(replayed)
    for entry_id in sorted(missing):
        print(f"not found: {entry_id}")
    return 1 if missing else 0
