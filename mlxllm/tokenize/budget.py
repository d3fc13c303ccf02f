"""What rendering one chat template may spend, and the meter that charges it (see `sandbox.py`).

A `Meter` is made per render and made current for it (a context variable, so concurrent renders in
threads keep their own). It holds the deadline, the size limit, the work left and the call depth, and
measures containers deep -- once each, caching their sizes for the render -- so that data shared many
times over (``[x, x]`` doubled in a loop) is seen at its real size before anything prints or compares it.
"""

from __future__ import annotations

import time
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.utils import Namespace

from ..errors import UserError


class ChatTemplateError(UserError, TemplateError, ValueError):
    """A chat template that does not compile, fails, or runs past its budget (one line in the CLI)."""


@dataclass(frozen=True)
class Budget:
    """What one render may spend. `chars` and `work` grow with the size of the input."""

    seconds: float = 2.0
    chars: int = 2 * 2**20  # the longest string, container (deep) or output
    work: int = 64 * 2**20  # roughly the bytes of everything built, summed
    depth: int = 64  # nested calls


RENDER = Budget()
PROBE = Budget(seconds=0.5)  # the end-of-turn probe at load time: a failed probe just finds nothing
MAX_NESTING = 256  # data nested deeper than this is refused (real messages and tools are far shallower)

_BUILTIN_CONTAINERS = (list, tuple, dict, set, frozenset, KeysView, ValuesView, ItemsView)


_LEAVES = frozenset({str, bytes, int, float, bool, type(None), range})


def _children(value: Any) -> Any:
    """What a container holds (None for a leaf)."""
    kind = type(value)
    if kind in _LEAVES:
        return None
    if kind is list or kind is tuple:
        return value
    if isinstance(value, Mapping):
        return [x for kv in value.items() for x in kv] if isinstance(value, dict) else None
    if isinstance(value, _BUILTIN_CONTAINERS):
        return value
    if isinstance(value, Namespace):
        return (object.__getattribute__(value, "_Namespace__attrs"),)
    return None


def _leaf_chars(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, range)) else 1


def _cost(value: Any) -> int:
    """Rough bytes a new value takes (its own storage, not what it shares)."""
    if isinstance(value, str):
        return 50 + (len(value) if value.isascii() else 4 * len(value))
    if isinstance(value, bytes):
        return 33 + len(value)
    if isinstance(value, (dict, set, frozenset)):
        return 232 + 64 * len(value)
    if isinstance(value, (list, tuple)):
        return 64 + 8 * len(value)
    return 32


class Meter:
    """The budget of one render, and the sizes of the containers it has measured."""

    def __init__(self, budget: Budget, input_chars: int = 0) -> None:
        self.budget = budget
        self.max_chars = budget.chars + 4 * input_chars
        self.work_left = budget.work + 16 * input_chars
        self.deadline = time.monotonic() + budget.seconds
        self.depth = 0
        self._sizes: dict[int, tuple[Any, int, int, int]] = {}  # id -> (value, chars, nodes, depth)

    def over(self, what: str) -> ChatTemplateError:
        return ChatTemplateError(f"the chat template ran past its budget ({what})")

    def tick(self, cost: int = 1) -> None:
        self.work_left -= cost
        if self.work_left < 0:
            raise self.over(f"it built more than {self.budget.work >> 20} MiB of data")
        if time.monotonic() > self.deadline:
            raise self.over(f"it ran longer than {self.budget.seconds:g} s")

    def allow(self, n: float, what: str = "a value") -> None:
        """Refuse to build something of about `n` characters or items past the size limit."""
        if n > self.max_chars:
            size = f"{int(n)} characters" if n < float("inf") else "too many characters"
            raise self.over(f"{what} of {size}; at most {self.max_chars}")

    def made(self, value: Any) -> Any:
        """Account for a value an operation built, and return it."""
        if not isinstance(value, (str, bytes)):
            self.size(value)
        elif len(value) > self.max_chars:
            raise self.over(f"a string of {len(value)} characters; at most {self.max_chars}")
        self.tick(_cost(value))
        return value

    def size(self, value: Any, limit: float | None = None) -> int:
        """Characters (of strings) plus items (of containers) in `value`, measured deep."""
        chars, n, _ = self.measure(value, limit)
        return chars + n

    def measure(self, value: Any, limit: float | None = None) -> tuple[int, int, int]:
        """(characters, nodes, depth) of `value`; past `limit` (default: the size limit) it stops with an
        error. Containers are measured once per render: an id's entry keeps its value alive."""
        if type(value) in _LEAVES:
            return _leaf_chars(value), 1, 0
        limit = self.max_chars if limit is None else limit
        hit = self._sizes.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1], hit[2], hit[3]
        kids = _children(value)
        if kids is None:
            return _leaf_chars(value), 1, 0
        # Iterative post-order walk; a frame is [value, iterator, chars, nodes, depth, cacheable].
        stack: list[list[Any]] = [[value, iter(kids), 0, 1, 1, not isinstance(value, Namespace)]]
        steps = 0
        while True:
            frame = stack[-1]
            for child in frame[1]:
                steps += 1
                if not steps & 0xFFF:
                    self.tick(0)
                hit = self._sizes.get(id(child))
                if hit is not None and hit[0] is child:
                    c, n, d = hit[1], hit[2], hit[3]
                else:
                    grandkids = _children(child)
                    if grandkids is not None:
                        if len(stack) >= MAX_NESTING:
                            raise self.over(f"data nested more than {MAX_NESTING} deep")
                        stack.append([child, iter(grandkids), 0, 1, 1, not isinstance(child, Namespace)])
                        break
                    c, n, d = _leaf_chars(child), 1, 0
                frame[2] += c
                frame[3] += n
                frame[4] = max(frame[4], d + 1)
                if frame[2] + frame[3] > limit:
                    raise self.over(f"a value of more than {int(limit)} characters and items")
            else:
                stack.pop()
                obj, _, c, n, d, cacheable = frame
                if cacheable:
                    self._sizes[id(obj)] = (obj, c, n, d)
                if not stack:
                    return c, n, d
                parent = stack[-1]
                parent[2] += c
                parent[3] += n
                parent[4] = max(parent[4], d + 1)
                parent[5] = parent[5] and cacheable
                if parent[2] + parent[3] > limit:
                    raise self.over(f"a value of more than {int(limit)} characters and items")


_METER: ContextVar[Meter | None] = ContextVar("mlxllm_chat_template_meter", default=None)


def current() -> Meter:
    """The meter of the render in progress (a fresh one outside renders: compile-time constant folding)."""
    meter = _METER.get()
    return meter if meter is not None else Meter(RENDER)


def metering(meter: Meter) -> Token:
    """Make `meter` the current one; returns the token to `reset` it with."""
    return _METER.set(meter)


def reset(token: Token) -> None:
    _METER.reset(token)


