"""Signatures follow Standard Webhooks: its own client verifies them, for every active secret."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bus.webhooks.signing import sign_headers


def test_signatures_verify_with_standardwebhooks_for_every_active_secret() -> None:
    secrets = ["whsec_" + base64.b64encode(bytes([i]) * 24).decode() for i in (1, 2)]
    body = b'{"type":"chain.end","timestamp":"2026-01-01T00:00:00Z","data":{"k":"\xc3\xa9"}}'
    headers = sign_headers(
        message_id="msg_1", timestamp=int(time.time()), body=body, secrets=secrets
    )
    assert headers["webhook-id"] == "msg_1"
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in secrets:
        assert Webhook(secret).verify(body, headers)["type"] == "chain.end"
    other = "whsec_" + base64.b64encode(b"\x03" * 24).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
