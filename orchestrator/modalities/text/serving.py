"""The text lane of `islands serve`: c-BTM completions decoded together one byte at a time
on the ensemble engine; streamed text is cut only on UTF-8 character boundaries."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from orchestrator.ensemble import Ensemble, Routing
from orchestrator.modalities.text.generation import (
    Continuation,
    Decoding,
    GenerateRequest,
    check_prompt,
)
from orchestrator.state.config import RunConfig
from runstore.errors import InputError


class TextLane:
    endpoint = "completions"
    unit = "bytes"

    def __init__(self, ensemble: Ensemble, metas: Sequence[dict[str, Any]],
                 config: RunConfig) -> None:
        self.ensemble = ensemble
        self.context = int(metas[0]["context"])
        self.inference = config.inference
        self.refresh_every = config.router.refresh_every
        self.decoding = Decoding(ensemble, self.context)
        # Per request: bytes already handed to its stream, and the decoder holding an
        # unfinished UTF-8 character back until its last byte arrives.
        self.sent: dict[int, tuple[int, Any]] = {}

    def check(self, body: Any) -> None:
        try:
            check_prompt(body.prompt, self.context)
        except InputError as err:
            raise InputError("prompt", err.problem) from None

    def open(self, bodies: Sequence[Any]) -> list[Continuation]:
        items = self.decoding.add([GenerateRequest(
            body.prompt, Routing(body.routing.strategy, body.routing.k),
            body.max_tokens or self.inference.max_new_tokens,
            self.inference.temperature if body.temperature is None else body.temperature,
            body.seed,
            self.refresh_every if body.refresh_every is None else body.refresh_every)
            for body in bodies])
        for item in items:
            self.sent[id(item)] = (0, codecs.getincrementaldecoder("utf-8")("replace"))
        return items

    def rows(self, item: Continuation) -> int:
        return 1

    def step(self, items: Sequence[Continuation]) -> None:
        self.decoding.step(items)

    def finished(self, item: Continuation) -> bool:
        return item.finished

    def fresh(self, item: Continuation) -> str:
        """The text added since the last call, whole characters only (the rest at the end)."""
        count, decoder = self.sent[id(item)]
        new = bytes(token for token in item.new[count:] if token < 256)
        self.sent[id(item)] = (len(item.new), decoder)
        return decoder.decode(new, final=item.finished)

    def result(self, item: Continuation, body: Any) -> dict[str, Any]:
        return {"text": item.text, "finish_reason": "stop" if item.stopped else "length",
                "prompt_bytes": len(item.tokens) - len(item.new) - 1,
                "completion_bytes": len(item.new),
                "routing": {"weights": [[round(float(w), 4) for w in row]
                                        for row in item.history]}}

    def retire(self, items: Sequence[Continuation]) -> None:
        for item in items:
            self.sent.pop(id(item), None)
        self.decoding.retire(items)
