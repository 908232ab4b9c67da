"""An app process for the end-to-end streaming test: one chat model streamed through the bus.

``python -m tests.support.chat_app TRACE_ID THREAD_ID TEXT`` streams ``TEXT`` from a
fake chat model with the run id ``TRACE_ID`` (so the trace id is known in advance)
and ``thread_id`` metadata, through :class:`BusCallbackHandler` built from the
environment, and prints what the model returned.
"""

from __future__ import annotations

import sys
import uuid

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings


def main(trace_id: str, thread_id: str, text: str) -> None:
    handler = BusCallbackHandler(settings=Settings.from_env())
    model = GenericFakeChatModel(messages=iter([AIMessage(content=text)]))
    config = {"run_id": uuid.UUID(trace_id), "metadata": {"thread_id": thread_id}}
    chunks = model.stream("hello", config={**config, "callbacks": [handler]})
    output = "".join(str(chunk.content) for chunk in chunks)
    handler.close()
    print(output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
