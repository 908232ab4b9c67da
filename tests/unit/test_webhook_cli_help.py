"""Every ``lcbus webhooks`` action answers ``--help`` (no Redis needed)."""

from __future__ import annotations

import pytest

from bus.cli import main as lcbus


@pytest.mark.parametrize(
    "action",
    ["add", "list", "show", "remove", "enable", "disable", "rotate-secret", "attempts", "replay"],
)
def test_cli_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        lcbus(["webhooks", action, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lcbus webhooks " + action in capsys.readouterr().out
