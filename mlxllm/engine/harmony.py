"""gpt-oss's harmony replies, parsed as the text streams in: a reply is a series of messages, each a
header (``<|channel|>NAME``, optionally addressed ``to=functions.TOOL``, optionally ``<|constrain|>json``)
then ``<|message|>`` and a body ended by ``<|end|>`` (another message follows, after ``<|start|>assistant``),
``<|call|>`` (a tool call: generation stops there) or ``<|return|>`` (the last answer).

The ``analysis`` channel is the model's thought, ``final`` (and unaddressed ``commentary``) its answer,
and a message addressed to a function is a tool call whose body is the arguments. A call whose
arguments are not a JSON object goes out as answer text, never as a call.
"""

from __future__ import annotations

import json
import re

from .stream import held_tail
from .tool_calls import ToolCall

MESSAGE, ENDS = "<|message|>", ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"to=(?:functions\.)?([^\s<]+)")


class HarmonyParser:
    """Generated text in, ``(thought, answer, calls)`` out, piece by piece; ``inside``: the prompt already
    opened the analysis channel (its header is not in the reply)."""

    def __init__(self, inside: bool = False) -> None:
        self._held, self.calls = "", 0
        self._channel: str | None = "analysis" if inside else None  # None: reading a header
        self._recipient: str | None = None
        self._body = ""  # a tool call's arguments so far

    def push(self, text: str) -> tuple[str, str, list[ToolCall]]:
        self._held += text
        thought, answer, calls = "", "", []
        while True:
            if self._channel is None:  # between messages: wait for the header to end
                at = self._held.find(MESSAGE)
                if at < 0:
                    return thought, answer, calls
                self._open(self._held[:at])
                self._held = self._held[at + len(MESSAGE):]
                continue
            ends = [(i, m) for m in ENDS if (i := self._held.find(m)) >= 0]
            if not ends:
                keep = held_tail(self._held, ENDS)
                piece, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
                t, a = self._route(piece)
                return thought + t, answer + a, calls
            at, marker = min(ends)
            t, a = self._route(self._held[:at])
            thought, answer = thought + t, answer + a
            self._held = self._held[at + len(marker):]
            a, call = self._close()
            answer, calls = answer + a, calls + call

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """At the end of generation (a call ends there: ``<|call|>`` stops it): what is still held."""
        held, self._held = self._held, ""
        if self._channel is None:  # no header came: the text as written
            return "", held, []
        thought, answer = self._route(held)
        more, calls = self._close()
        return thought, answer + more, calls

    def _open(self, header: str) -> None:
        name = header.split("<|channel|>", 1)[-1].strip()
        self._channel = name.split()[0].split("<|")[0] if name else "final"
        found = _RECIPIENT.search(header)
        self._recipient, self._body = (found.group(1) if found else None), ""

    def _route(self, piece: str) -> tuple[str, str]:
        if self._recipient is not None:
            self._body += piece
            return "", ""
        return (piece, "") if self._channel == "analysis" else ("", piece)

    def _close(self) -> tuple[str, list[ToolCall]]:
        """End the current message: a call to a function if its body is a JSON object, else its text."""
        name, body = self._recipient, self._body
        self._channel, self._recipient, self._body = None, None, ""
        if name is None:
            return "", []
        try:
            args = json.loads(body)
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            return body, []
        self.calls += 1
        return "", [ToolCall(name, json.dumps(args, ensure_ascii=False))]
