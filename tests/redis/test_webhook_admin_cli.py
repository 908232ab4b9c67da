"""The admin HTTP routes (in a small Starlette app) and ``lcbus webhooks``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.routing import Mount

from bus.cli import main as lcbus
from bus.settings import Settings
from bus.webhooks.admin import admin_routes
from tests.support.webhooks import LOOPBACK

AUTH = {"authorization": "Bearer s3cret"}


@pytest.fixture
async def admin(
    settings: Settings, async_redis: aioredis.Redis
) -> AsyncIterator[httpx.AsyncClient]:
    cfg = settings.replace(admin_token="s3cret", webhook_allow_networks=LOOPBACK)
    app = Starlette(routes=[Mount("/admin", routes=admin_routes(cfg, async_redis))])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


async def test_admin_auth(
    admin: httpx.AsyncClient, settings: Settings, async_redis: aioredis.Redis
) -> None:
    assert (await admin.get("/admin/webhooks/endpoints")).status_code == 401
    wrong = {"authorization": "Bearer nope"}
    assert (await admin.get("/admin/webhooks/endpoints", headers=wrong)).status_code == 403
    closed = Starlette(routes=[Mount("/admin", routes=admin_routes(settings, async_redis))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=closed), base_url="http://admin"
    ) as client:
        response = await client.get("/admin/webhooks/endpoints", headers=AUTH)
        assert response.status_code == 503 and "LCBUS_ADMIN_TOKEN" in response.json()["error"]


async def test_admin_crud(admin: httpx.AsyncClient) -> None:
    base = "/admin/webhooks/endpoints"
    created = await admin.post(
        base, headers=AUTH, json={"url": "http://127.0.0.1:9/x", "events": ["chain.*"]}
    )
    assert created.status_code == 201
    endpoint = created.json()
    assert endpoint["secrets"][0]["value"].startswith("whsec_")
    listed = (await admin.get(base, headers=AUTH)).json()
    assert [e["id"] for e in listed] == [endpoint["id"]]
    assert listed[0]["secrets"][0]["value"].endswith("…")
    one = f"{base}/{endpoint['id']}"
    disabled = await admin.post(one + "/disable", headers=AUTH, json={"reason": "test"})
    assert disabled.json()["enabled"] is False and disabled.json()["disabled_reason"] == "test"
    assert (await admin.post(one + "/enable", headers=AUTH)).json()["enabled"] is True
    rotated = await admin.post(one + "/rotate-secret", headers=AUTH, json={"grace_s": 5})
    assert len(rotated.json()["secrets"]) == 2
    assert (await admin.get(one + "/attempts", headers=AUTH)).json() == []
    assert (await admin.delete(one, headers=AUTH)).status_code == 204
    assert (await admin.get(one, headers=AUTH)).status_code == 404


async def test_admin_refuses_bad_input(admin: httpx.AsyncClient) -> None:
    base = "/admin/webhooks/endpoints"
    refused = await admin.post(base, headers=AUTH, json={"url": "http://169.254.169.254/"})
    assert refused.status_code == 400 and "link-local" in refused.json()["error"]
    unknown = await admin.post(base, headers=AUTH, json={"url": "http://127.0.0.1:9/", "x": 1})
    assert unknown.status_code == 400
    assert (await admin.post("/admin/webhooks/replay", headers=AUTH, json={})).status_code == 400
    missing = await admin.post("/admin/webhooks/replay", headers=AUTH, json={"message_id": "m"})
    assert missing.status_code == 400 and "no dead letter" in missing.json()["error"]


def test_cli_round_trip(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LCBUS_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("LCBUS_PREFIX", settings.prefix)
    monkeypatch.setenv("LCBUS_WEBHOOK_ALLOW_NETWORKS", LOOPBACK)

    def run(*argv: str) -> object:
        code = lcbus(["webhooks", *argv])
        out = capsys.readouterr()
        assert code == 0, out.err
        return json.loads(out.out)

    added = run("add", "http://localhost:9/h", "--event", "tool.*", "--metadata", "team=a")
    assert isinstance(added, dict) and added["metadata"] == {"team": "a"}
    endpoint_id = added["id"]
    assert [e["id"] for e in run("list")] == [endpoint_id]  # type: ignore[union-attr]
    assert run("disable", endpoint_id, "--reason", "r")["enabled"] is False  # type: ignore[index]
    assert run("enable", endpoint_id)["enabled"] is True  # type: ignore[index]
    assert len(run("rotate-secret", endpoint_id)["secrets"]) == 2  # type: ignore[index]
    assert run("attempts", endpoint_id) == []
    assert run("replay", "--since", "1h") == {"replayed": 0}
    assert run("remove", endpoint_id) == {"removed": endpoint_id}
    assert lcbus(["webhooks", "show", endpoint_id]) == 1
    assert "no webhook endpoint" in capsys.readouterr().err
    monkeypatch.delenv("LCBUS_WEBHOOK_ALLOW_NETWORKS")
    assert lcbus(["webhooks", "add", "http://[::1]/"]) == 1
    assert "loopback" in capsys.readouterr().err
