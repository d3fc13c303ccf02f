"""Reasoning models (``<think>...</think>``, or gpt-oss's harmony channels): their thinking told apart
from their answer, in text for the APIs (``ReasoningParser``) and in tokens for the engine
(``ThinkingBudget``), which ends a thought that has used its budget by writing the closing marker itself.

Many templates open the thought in the prompt (DeepSeek-R1 and some Qwen3 templates end the
generation prompt with ``<think>``); then the reply starts inside it and has no opening marker.
Harmony (gpt-oss) thinks in its ``analysis`` channel and answers in its ``final`` one: the thought's
closing marker is the end of that message plus the final channel's header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .stream import held_tail

START, END = "<think>", "</think>"
HARMONY = ("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>")


def markers_of(template: str) -> tuple[str, str] | None:
    """A template's (opening, closing) thought markers: harmony's channels, ``<think>``, or None."""
    if HARMONY[0] in template or "<|channel|>" in template and "analysis" in template:
        return HARMONY
    return (START, END) if START in template else None


@dataclass(frozen=True)
class Reasoning:
    """How a request's model thinks: the markers' token ids, whether the prompt leaves it inside a
    thought, and how many tokens a thought may take (None: no limit)."""

    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    open: bool = False
    budget: int | None = None
    start: str = START
    end: str = END


def reasoning_for(tokenizer: Any, prompt_text: str, budget: int | None) -> Reasoning | None:
    """The ``Reasoning`` of a chat prompt, when the model's template writes thinking markers."""
    markers = markers_of(tokenizer.chat_template or "")
    if markers is None:
        return None
    ids = [tuple(tokenizer.encode(m, add_special_tokens=False)) for m in markers]
    return Reasoning(ids[0], ids[1], prompt_text.rstrip().endswith(markers[0]), budget, *markers)


class ThinkingBudget:
    """Follows one sequence's tokens in and out of thoughts; once a thought has taken ``budget``
    tokens, ``forced`` names the closing marker's ids one by one."""

    def __init__(self, spec: Reasoning) -> None:
        self.spec, self.inside, self.used = spec, spec.open, 0
        self.pending: list[int] = list(spec.end_ids) if spec.open and spec.budget == 0 else []
        self._tail: list[int] = []

    def forced(self) -> int | None:
        return self.pending[0] if self.pending else None

    def push(self, token: int) -> None:
        if self.pending and token == self.pending[0]:
            self.pending.pop(0)
        width = max(len(self.spec.start_ids), len(self.spec.end_ids))
        self._tail = (self._tail + [token])[-width:]
        if not self.inside:
            if self._ends_with(self.spec.start_ids):
                self.inside, self.used = True, 0
                self.pending = list(self.spec.end_ids) if self.spec.budget == 0 else []
            return
        if self._ends_with(self.spec.end_ids):
            self.inside, self.pending = False, []
            return
        self.used += 1
        if self.spec.budget is not None and self.used >= self.spec.budget and not self.pending:
            self.pending = list(self.spec.end_ids)

    def _ends_with(self, ids: tuple[int, ...]) -> bool:
        return bool(ids) and tuple(self._tail[-len(ids):]) == ids


class ReasoningParser:
    """Generated text in, ``(reasoning, answer)`` text out, piece by piece; a possible marker is held
    back until it is clear."""

    def __init__(self, inside: bool, markers: tuple[str, str] = (START, END)) -> None:
        self.inside, self._held, self.markers = inside, "", markers
        self._after = False  # just past a thought: the newlines templates put there are dropped

    def push(self, text: str) -> tuple[str, str]:
        self._held += text
        thought, answer = "", ""
        while True:
            marker = self.markers[1] if self.inside else self.markers[0]
            at = self._held.find(marker)
            if at < 0:
                keep = held_tail(self._held, (marker,))
                piece, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
                return (thought + piece, answer) if self.inside else (thought, answer + self._answer(piece))
            piece, self._held = self._held[:at], self._held[at + len(marker):]
            if self.inside:
                thought, self._after = thought + piece, True
            else:
                answer += self._answer(piece)
            self.inside = not self.inside

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.inside else ("", self._answer(held))

    def _answer(self, piece: str) -> str:
        if self._after:
            piece = piece.lstrip("\n")
            self._after = not piece
        return piece
