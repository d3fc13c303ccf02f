"""A reply's parts as both APIs report them: the model's thought (``<think>...</think>`` or harmony's
analysis channel), its answer text, and the tool calls in that answer, separated piece by piece as the
text streams in."""

from __future__ import annotations

from typing import Any

from ..engine.harmony import HarmonyParser
from ..engine.reasoning import HARMONY, Reasoning, ReasoningParser, reasoning_for
from ..engine.tool_calls import ToolCall, ToolCallParser


def prompt_reasoning(tokenizer: Any, ids: list[int], budget: int | None) -> Reasoning | None:
    """The thinking markers of a chat prompt's model (None if its template has none), and whether the
    prompt (its last tokens) already opened a thought."""
    return reasoning_for(tokenizer, tokenizer.decode(ids[-16:]), budget)


class ReplySplitter:
    """Text in; ``(thought, answer, calls)`` out. Without a reasoning model everything is answer;
    without tools the answer holds no calls; a harmony model (gpt-oss) writes all three in its channels."""

    def __init__(self, reasoning: Reasoning | None, tools: ToolCallParser | None) -> None:
        harmony = reasoning is not None and reasoning.start == HARMONY[0]
        self.harmony = HarmonyParser(reasoning.open) if harmony else None  # thoughts and calls in one format
        self.thoughts = ReasoningParser(reasoning.open, (reasoning.start, reasoning.end)) if (
            reasoning is not None and not harmony) else None
        self.tools = None if harmony else tools
        self.calls_allowed = tools is not None  # without tools a harmony call's arguments are answer text

    @property
    def calls(self) -> int:
        if self.harmony is not None:
            return self.harmony.calls
        return self.tools.calls if self.tools is not None else 0

    def push(self, text: str, last: bool = False) -> tuple[str, str, list[ToolCall]]:
        """The parts ``text`` completes (``last``: generation is over, flush what is held)."""
        if self.harmony is not None:
            thought, answer, calls = self.harmony.push(text)
            if last:
                more = self.harmony.finish()
                thought, answer, calls = thought + more[0], answer + more[1], calls + more[2]
            if not self.calls_allowed:
                answer, calls = answer + "".join(c.arguments for c in calls), []
            return thought, answer, calls
        thought, answer = self.thoughts.push(text) if self.thoughts is not None else ("", text)
        if last and self.thoughts is not None:
            more_thought, more_answer = self.thoughts.finish()
            thought, answer = thought + more_thought, answer + more_answer
        if self.tools is None:
            return thought, answer, []
        answer, calls = self.tools.push(answer)
        if last:
            tail, more = self.tools.finish()
            answer, calls = answer + tail, calls + more
        return thought, answer, calls
