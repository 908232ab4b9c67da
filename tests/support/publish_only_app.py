"""A publish-only app, run by the base-install test in a venv holding only the base package.

Run by path with ``python -I`` (so neither this checkout nor ``PYTHONPATH`` is
importable): streams a fake-model chain through :class:`BusCallbackHandler`
under the ``LCBUS_*`` settings of the environment, with the root run id
given as the only argument, and prints what the test checks as JSON.
"""

import importlib.util
import json
import sys
import uuid

from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import bus
from bus import BusCallbackHandler, Settings

ABSENT = ("arq", "prometheus_client", "starlette", "uvicorn", "fakeredis", "langchain_openai")


def main() -> None:
    handler = BusCallbackHandler(settings=Settings.from_env())
    model = GenericFakeChatModel(messages=iter([AIMessage("Hello from the bus")]))
    prompt = ChatPromptTemplate.from_messages([("human", "Say hello to {who}")])
    chain = prompt | model | StrOutputParser()
    config = {"callbacks": [handler], "run_id": uuid.UUID(sys.argv[1])}
    answer = "".join(chain.stream({"who": "Redis"}, config=config))  # type: ignore[arg-type]
    flushed = handler.publisher.flush(10)
    handler.close()
    report = {
        "answer": answer,
        "flushed": flushed,
        "bus_file": bus.__file__,
        "installed": sorted(name for name in ABSENT if importlib.util.find_spec(name)),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
