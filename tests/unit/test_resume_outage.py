"""A resume position the frontend cannot check because the history's slot is down."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError

from bus.errors import InvalidPosition
from bus.frontend.follow import Start, resolve
from bus.history import Topic
from bus.keys import Keys


class _Answers:
    """A client whose XRANGE replies with one error, as a cluster node does."""

    def __init__(self, error: ResponseError) -> None:
        self.error = error

    async def xrange(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        ClusterDownError("CLUSTERDOWN The cluster is down"),
        TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    ],
)
async def test_an_unserved_slot_is_an_outage_not_an_invalid_position(
    error: ResponseError,
) -> None:
    # A restarted master answers CLUSTERDOWN until it has rejoined: the client must
    # be told to retry (the stream's retryable ``unavailable``), not that its id is bad.
    with pytest.raises(type(error)):
        await resolve(_Answers(error), Keys("p"), Topic("trace", "t"), Start("1-0"))  # type: ignore[arg-type]


async def test_an_id_the_server_refuses_is_an_invalid_position() -> None:
    refused = ResponseError("Invalid stream ID specified as stream command argument")
    with pytest.raises(InvalidPosition):
        await resolve(_Answers(refused), Keys("p"), Topic("trace", "t"), Start("1-0"))  # type: ignore[arg-type]
