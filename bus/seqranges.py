"""Sets of sequence numbers as sorted, disjoint ``[lo, hi]`` ranges.

A producer numbers the events of each trace 1, 2, 3, ... (``seq``, per
``source``), so the seqs a consumer has applied compress to one range in the
usual case and to a few after a gap. Consumers use them to recognise an event
they already applied by its own identity ``(source, seq)``, whichever stream
entry carried it: a batch the publisher re-sent after a timeout lands twice
under two entry ids.
"""

from __future__ import annotations

import bisect

SeqRanges = list[list[int]]


def add_seq(ranges: SeqRanges, seq: int) -> bool:
    """Add ``seq`` to sorted, disjoint ``[lo, hi]`` ranges; False if already there."""
    if ranges and ranges[-1][1] == seq - 1:  # the usual case: events in order
        ranges[-1][1] = seq
        return True
    index = bisect.bisect_right(ranges, [seq, float("inf")])
    if index and ranges[index - 1][1] >= seq:
        return False
    joins_left = index > 0 and ranges[index - 1][1] == seq - 1
    joins_right = index < len(ranges) and ranges[index][0] == seq + 1
    if joins_left and joins_right:
        ranges[index - 1][1] = ranges[index][1]
        del ranges[index]
    elif joins_left:
        ranges[index - 1][1] = seq
    elif joins_right:
        ranges[index][0] = seq
    else:
        ranges.insert(index, [seq, seq])
    return True
