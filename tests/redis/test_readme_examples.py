"""The README's code runs as written, against the real Redis."""

from __future__ import annotations

import re

import pytest
import redis
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from bus import events as ev
from bus.settings import Settings
from tests.support.processes import ROOT
from tests.support.published import read_all


def readme_block(heading: str, index: int = 0) -> str:
    """The ``index``-th python code block of the README section under ``heading``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def test_quickstart_builds_its_settings_from_the_environment(
    settings: Settings, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefix, partitions and stream secret the workers use reach the handler."""
    for name, value in settings.replace(stream_secret="s3cret").to_env().items():
        monkeypatch.setenv(name, value)
    model = GenericFakeChatModel(messages=iter([AIMessage(content="hello there")]))
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model | StrOutputParser()
    namespace: dict[str, object] = {"chain": chain}
    exec(readme_block("Quickstart: attach the bus to an existing LangChain app"), namespace)
    handler = namespace["handler"]
    assert isinstance(namespace["settings"], Settings)
    assert namespace["settings"].stream_secret == "s3cret"
    assert handler.publisher.flush(5)  # type: ignore[attr-defined]
    handler.close()  # type: ignore[attr-defined]
    events = read_all(sync_redis, settings)  # the test's own prefix and partitions
    starts = [e.name for e in events if isinstance(e, ev.ChainStart) and e.parent_run_id is None]
    assert starts == ["RunnableSequence"]
    ends = [e for e in events if isinstance(e, ev.LLMEnd)]
    assert [e.text for e in ends] == ["hello there"]
