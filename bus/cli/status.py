"""``lcbus status``: consumer groups, lag, pending and dead letters."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from bus.connect import async_client
from bus.runtime.status import BusStatus, collect_status
from bus.settings import Settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="show consumer groups, lag and dead letters")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


async def _collect(settings: Settings) -> BusStatus:
    client = async_client(settings)
    try:
        return await collect_status(client, settings)
    finally:
        await client.aclose()


def render(status: BusStatus) -> str:
    lines = [
        f"prefix {status.prefix}: {sum(status.stream_lengths)} entries in "
        f"{len(status.stream_lengths)} partitions"
    ]
    if not status.groups:
        lines.append("no consumer groups")
    for group in status.groups:
        lines.append(
            f"group {group.name}: lag {group.lag}, pending {group.pending}, "
            f"dead letters {group.dead_letters}, members {len(group.members)}"
        )
        for p in group.partitions:
            lines.append(
                f"  p{p.partition:<3} lag {p.lag:>8}  pending {p.pending:>6}  "
                f"owner {p.owner or '-'}"
            )
    for pub in status.publishers:
        lines.append(
            f"publisher {pub['source']}: published {pub['published']}, dropped {pub['dropped']}, "
            f"errors {pub['errors']}, buffer {pub['buffer_depth']}, reconnects {pub['reconnects']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    status = asyncio.run(_collect(Settings.from_env()))
    print(json.dumps(status.to_dict()) if args.json else render(status))
    return 0
