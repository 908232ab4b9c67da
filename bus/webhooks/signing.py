"""Standard Webhooks signatures, made with the ``standardwebhooks`` package.

Headers of every delivery:

- ``webhook-id``: the message id, the same on every attempt (receivers
  deduplicate on it);
- ``webhook-timestamp``: Unix seconds of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``,
  one per active secret, separated by spaces, so a receiver that still holds
  a rotated-out secret keeps verifying during the grace period.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


@functools.lru_cache(maxsize=1024)
def _signer(secret: str) -> Webhook:
    # Building a Webhook base64-decodes the secret; endpoints reuse theirs.
    return Webhook(secret)


def sign_headers(
    *, message_id: str, timestamp: int, body: bytes, secrets: Sequence[str]
) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    text = body.decode()
    signatures = " ".join(
        _signer(secret).sign(msg_id=message_id, timestamp=when, data=text) for secret in secrets
    )
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }
