"""Live items handed to a waiting stream at once (follow's ``inline``): in order, or queued.

The subscriber offers a live item to ``inline`` only while its queue is empty and
nothing is pending; the follower's taker passes on the item that continues the
cursor and leaves gaps, the final item and everything behind a refused item to
the queue, where the follower handles them as before.
"""

from __future__ import annotations

from bus.frontend.follow import _Cursor, _inline_taker
from bus.frontend.subscriber import Subscriber
from bus.history import StreamItem


def _item(seq: int, *, final: bool = False) -> StreamItem:
    return StreamItem(f"1-{seq}", seq, "messages", final, b'{"seq": %d}' % seq)


class _Sink:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.accepting = True

    def __call__(self, item: StreamItem) -> bool:
        if not self.accepting:
            return False
        self.sent.append(item.seq)
        return True


def _live() -> tuple[Subscriber, _Cursor, _Sink]:
    sub, cursor, sink = Subscriber(100), _Cursor(), _Sink()
    sub.resync = False  # caught up with history, waiting for live items
    sub.inline = _inline_taker(cursor, sink)
    return sub, cursor, sink


def _queued(sub: Subscriber) -> list[int]:
    return [item.seq for item in sub.items]


def test_items_in_sequence_go_out_at_once_and_advance_the_cursor() -> None:
    sub, cursor, sink = _live()
    for seq in (1, 2, 3):
        sub.offer(_item(seq))
    assert sink.sent == [1, 2, 3] and _queued(sub) == []
    assert (cursor.seq, cursor.event_id) == (3, "1-3")
    sub.offer(_item(2))  # a duplicate (already delivered): dropped, as the follower drops it
    assert sink.sent == [1, 2, 3] and _queued(sub) == []


def test_a_refused_item_queues_and_every_later_one_queues_behind_it() -> None:
    sub, cursor, sink = _live()
    sub.offer(_item(1))
    sink.accepting = False
    sub.offer(_item(2))
    sink.accepting = True
    sub.offer(_item(3))  # the sink would take it, but it must not overtake 2
    assert sink.sent == [1] and _queued(sub) == [2, 3]
    assert cursor.seq == 1


def test_a_gap_and_the_final_item_are_left_to_the_follower() -> None:
    sub, cursor, sink = _live()
    sub.offer(_item(1))
    sub.offer(_item(3))  # 2 was lost: the follower resyncs from history
    assert sink.sent == [1] and _queued(sub) == [3] and cursor.seq == 1
    sub.items.clear()
    sub.offer(_item(2, final=True))  # the follower ends the stream after it
    assert sink.sent == [1] and _queued(sub) == [2]


def test_nothing_goes_inline_while_a_resync_or_a_shutdown_is_pending() -> None:
    sub, _, sink = _live()
    sub.request_resync()
    sub.offer(_item(1))
    sub.resync = False
    sub.items.clear()
    sub.drain_for_shutdown()
    sub.offer(_item(1))
    assert sink.sent == []
