"""An SSE event stays one line whatever text a model generates (schemathesis found a token
with U+0085 cutting an event in two for a reader that splits with str.splitlines)."""

from __future__ import annotations

import asyncio
import json

from kvrt.runtime.server.openai_serving import _send


class _Written:
    def __init__(self) -> None:
        self.data = b""

    async def write(self, data: bytes) -> None:
        self.data += data


def test_line_separators_in_generated_text_are_escaped() -> None:
    text = "a\x85b\u2028c\u2029d\ne"
    response = _Written()
    asyncio.run(_send(response, {"delta": text}))
    event = response.data.decode("utf-8")
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event.removeprefix("data: "))["delta"] == text
