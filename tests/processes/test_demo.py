"""``make demo``'s program: the whole stack end to end, and the browser page in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bus.demo.ports import free_port
from tests.support.processes import ROOT, wait_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "LCBUS_REDIS_URL"}}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def assert_stopped(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is stopped too; anything else is a leaked process.
        with open(f"/proc/{pid}/stat") as stat:
            assert stat.read().split()[2] == "Z", f"process {pid} still running"


def test_demo_on_the_embedded_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bus.demo"],
        cwd=ROOT,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["ok"] is True and summary["failed_checks"] == []
    assert summary["tokens"] > 0 and summary["trace_runs"] >= 10
    assert summary["webhooks_verified"] >= 4
    assert set(summary["webhook_types"]) == {"llm.end", "tool.end", "trace.completed"}
    assert "embedded" in result.stdout
    assert_stopped(summary["pids"])


def test_demo_failure_is_reported_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bus.demo", "--openai"],
        cwd=ROOT,
        env={**demo_env(), "OPENAI_API_KEY": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is False and "OPENAI_API_KEY" in summary["reason"]


@pytest.fixture
def served_demo() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bus.demo", "--serve", "--port", str(port), "--token-delay", "0.06"],
        cwd=ROOT,
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", within=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["ok"] is True, out + err
        assert_stopped(summary["pids"])


@pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="Chromium is not installed")
def test_browser_page_streams_resumes_and_draws_the_trace(served_demo: str) -> None:
    from playwright.sync_api import sync_playwright

    from bus.demo.openai_server import DEFAULT_ANSWER

    assert CHROMIUM is not None, "CI must install Chromium (.ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page()
        page.goto(served_demo + "/")
        page.click("#run")
        # Drop the connection mid-answer: the page resumes from its last event id.
        page.wait_for_function("window.lcbus.text.length > 10")
        assert not page.evaluate("window.lcbus.done")
        page.click("#reconnect")
        page.wait_for_function("window.lcbus.done", timeout=30_000)
        state = page.evaluate(
            "({text: window.lcbus.text, seqs: [...window.lcbus.seen], dup: window.lcbus.duplicates,"
            " reconnects: window.lcbus.reconnects})"
        )
        assert state["text"] == DEFAULT_ANSWER
        assert page.inner_text("#answer") == DEFAULT_ANSWER
        assert state["reconnects"] == 1 and state["dup"] == 0
        assert sorted(state["seqs"]) == list(range(1, len(state["seqs"]) + 1))
        page.wait_for_function("document.querySelectorAll('#waterfall .row').length >= 12")
        labels = page.eval_on_selector_all(
            "#waterfall .label", "els => els.map(e => e.textContent)"
        )
        assert labels[0] == "RunnableSequence"
        assert {"ChatOpenAI", "word_count", "NotesRetriever", "ChatPromptTemplate"} <= set(labels)
        page.wait_for_function("document.querySelectorAll('#deliveries tbody tr').length >= 4")
        statuses = page.eval_on_selector_all("#deliveries td.ok", "els => els.length")
        assert statuses >= 4
        page.screenshot(path=str(ROOT / ".pytest_cache" / "demo-page.png"), full_page=True)
        browser.close()
