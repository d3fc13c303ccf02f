"""A Jinja sandbox with a budget, for the chat templates that come with model files.

Jinja's sandbox keeps templates away from Python internals, but not from spending unbounded time or
memory: nested ``range()`` loops, ``'a' * 10**9``, a macro calling itself, a list doubled in a loop.
Here everything that can take long or build something large goes through the current render's
`budget.Meter`, which stops the render with `ChatTemplateError` ("ran past its budget") as soon as one
of these is exceeded:

- time: a deadline, checked on every loop iteration, call, filter, operator and output chunk. Loops
  are counted by the code generator (``for x in y`` iterates ``environment.mlxllm_iter(y)``), so a
  loop over a list built earlier is counted as well as one over ``range()``;
- size: no string, container or output longer than ``max_chars`` (which grows with the input).
  Operations that multiply (``*``, ``**``, ``%``, ``+``, ``~``, and filters or methods such as
  ``indent``, ``join``, ``replace``, ``center``, ``format``, ``tojson(indent=...)``) are checked
  *before* they run, from the sizes of their operands; list, tuple and dict literals are measured as
  they are made;
- work: the rough number of bytes everything built takes, summed over the render, which bounds the
  memory a render can hold;
- depth: calls nested (macros calling macros, recursive loops), and data nested.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from .budget import Meter, current

_MAX_INT_BITS = 1 << 16


# --- checks before an operation runs ------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _format_bound(m: Meter, fmt: str, values: list[Any]) -> float:
    """An upper bound on the length of `fmt` formatted (`%` or `str.format`) with `values`: each
    field is at most its literal width or precision, an int given as a width, or the largest value."""
    runs = re.findall(r"\d+", fmt)
    if any(len(r) > 9 for r in runs):
        return float("inf")
    widest = max((abs(v) for v in values if _is_int(v)), default=0)
    biggest = max((m.size(v) for v in values), default=0)
    fields = fmt.count("{") + fmt.count("%")
    return len(fmt) + sum(map(int, runs)) + fields * (biggest + widest)


def _format_values(right: Any) -> list[Any]:
    if isinstance(right, tuple):
        return list(right)
    if isinstance(right, Mapping):
        return list(right.values())
    return [right]


def _check_binop(m: Meter, op: str, left: Any, right: Any) -> None:
    if op == "*":
        if _is_int(left) and _is_int(right):
            if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise m.over("an integer too large")
            return
        seq, n = (left, right) if _is_int(right) else (right, left)
        if _is_int(n) and isinstance(seq, (str, bytes)):
            m.allow(len(seq) * max(n, 0), "a repetition")
        elif _is_int(n) and isinstance(seq, (list, tuple)):
            m.allow(m.size(seq) * max(n, 0), "a repetition")
    elif op == "+":
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            m.allow(len(left) + len(right), "a concatenation")
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            m.allow(m.size(left) + m.size(right), "a concatenation")
    elif op == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            if abs(left).bit_length() * right > _MAX_INT_BITS:
                raise m.over("an integer too large")
    elif op == "%" and isinstance(left, str):
        m.allow(_format_bound(m, left, _format_values(right)), "a formatted string")


def _first(args: tuple, kwargs: dict, name: str, default: Any) -> Any:
    return args[0] if args else kwargs.get(name, default)


def _check_str_method(m: Meter, s: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
    """Check a call of a string method that can build more than its input; returns the arguments
    to call it with (an iterable given to ``join`` is read into a list first)."""
    if name in ("ljust", "rjust", "center", "zfill"):
        width = _first(args, kwargs, "width", 0)
        if _is_int(width):
            m.allow(width, f"str.{name}()")
    elif name == "expandtabs":
        tab = _first(args, kwargs, "tabsize", 8)
        if _is_int(tab):
            m.allow(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(tab, 0), "str.expandtabs()")
    elif name == "join" and args:
        items = list(args[0])
        m.allow(sum(m.size(x) for x in items) + len(s) * len(items), "str.join()")
        return (items, *args[1:])
    elif name == "replace" and len(args) >= 2:
        _check_replace(m, s, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        m.allow(len(s) * max(longest, 1), "str.translate()")
    elif name in ("format", "format_map") and isinstance(s, str):
        values = [*args, *kwargs.values()]
        if name == "format_map" and args and isinstance(args[0], Mapping):
            values = list(args[0].values())
        m.allow(_format_bound(m, s, values), f"str.{name}()")
    return args


def _check_replace(m: Meter, s: Any, old: Any, new: Any, count: Any) -> None:
    if not isinstance(s, (str, bytes)) or type(old) is not type(s) or type(new) is not type(s):
        return
    hits = s.count(old) if old else len(s) + 1
    if _is_int(count) and count >= 0:
        hits = min(hits, count)
    m.allow(len(s) + hits * max(len(new) - len(old), 0), "replace()")


def _width(value: Any) -> int:
    return len(value) if isinstance(value, str) else value if _is_int(value) else 0


# Filters that can build much more than their input, each checked with the filter's own signature
# (minus the value's size, which every filter call checks). A check may return a replacement value.
def _f_indent(m, s, width=4, first=False, blank=False):
    text = s if isinstance(s, str) else ""
    m.allow(len(text) + (text.count("\n") + 1) * _width(width), "indent")


def _f_center(m, value, width=80):
    m.allow(_width(width), "center")


def _f_join(m, value, d="", attribute=None):
    items = list(value)
    m.allow(sum(m.size(x) for x in items) + len(str(d)) * len(items), "join")
    return items


def _f_replace(m, s, old, new, count=None):
    _check_replace(m, s, old, new, count)


def _f_wordwrap(m, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    m.allow(len(str(s)) * (1 + len(wrapstring or "\n")), "wordwrap")


def _f_format(m, value, *args, **kwargs):
    if isinstance(value, str):
        m.allow(_format_bound(m, value, [*args, *kwargs.values()]), "format")


def _f_count_arg(m, value, n=0, fill_with=None):
    if _is_int(n):
        m.allow(n, "batch/slice")


def _f_tojson(m, value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    chars, n, depth = m.measure(value)
    seps = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, (list, tuple)) else 2
    m.allow(chars + n * (seps + 2 + _width(indent) * depth), "tojson")


def _f_pprint(m, value):
    chars, n, depth = m.measure(value)
    m.allow(chars + n * (4 + depth), "pprint")


def _f_urlize(m, value, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None):
    text = str(value)
    m.allow(3 * len(text) + (len(text) // 4 + 1) * (64 + _width(target) + _width(rel)), "urlize")


def _f_sum(m, iterable, attribute=None, start=0):
    items = list(iterable)
    if not all(isinstance(x, (int, float)) for x in items) or not isinstance(start, (int, float)):
        m.allow(len(items) * (sum(m.size(x) for x in items) + m.size(start)), "sum")
    return items


_FILTER_CHECKS = {"indent": _f_indent, "center": _f_center, "join": _f_join, "replace": _f_replace,
                  "wordwrap": _f_wordwrap, "format": _f_format, "batch": _f_count_arg, "slice": _f_count_arg,
                  "tojson": _f_tojson, "pprint": _f_pprint, "urlize": _f_urlize, "sum": _f_sum}  # fmt: skip


def _metered_filter(name: str, func: Any) -> Any:
    check = _FILTER_CHECKS.get(name)
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # a context / eval context / environment first

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        m = current()
        m.tick()
        for value in (*args[skip:], *kwargs.values()):
            m.size(value)
        if check is not None and len(args) > skip:
            try:
                replaced = check(m, *args[skip:], **kwargs)
            except TypeError:  # arguments the filter itself will reject
                replaced = None
            if replaced is not None:
                args = (*args[:skip], replaced, *args[skip + 1 :])
        return m.made(func(*args, **kwargs))

    return run


def _range(*args: Any) -> range:
    rng = range(*args)
    try:
        n = len(rng)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise current().over(f"range() of more than {MAX_RANGE} items")
    return rng


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` value before it becomes text: containers are measured first."""
    if not isinstance(value, str):
        current().size(value)
    return value


# --- the code generator: loops, literals and `~` go through the meter --------------------------------


class _MeteredCodeGenerator(CodeGenerator):
    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        # Jinja allows no custom node types: the iterable becomes `environment.mlxllm_iter(iterable)`.
        it = node.iter
        if not (isinstance(it, nodes.Call) and isinstance(it.node, nodes.EnvironmentAttribute)):
            counted = nodes.EnvironmentAttribute("mlxllm_iter", lineno=it.lineno, environment=self.environment)
            node.iter = nodes.Call(counted, [it], [], None, None, lineno=it.lineno, environment=self.environment)
        super().visit_For(node, frame)

    def _made(self, visit: Any, node: nodes.Expr, frame: Frame) -> None:
        self.write("environment.mlxllm_made(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._made(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._made(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":
            self._made(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.mlxllm_concat({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every loop, call, filter, multiplying operator, literal and output
    charged to the current render's `Meter`."""

    code_generator_class = _MeteredCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.globals["range"] = _range
        self.globals.pop("lipsum", None)  # builds any amount of text; no chat template uses it

    def meter_filters(self) -> None:
        """Wrap every filter (call after adding the environment's own)."""
        self.filters = {name: _metered_filter(name, f) for name, f in self.filters.items()}

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        m = current()
        m.tick()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
        given = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}  # jinja's own
        if isinstance(owner, (str, bytes)):
            args = _check_str_method(m, owner, name, args, given)
        elif _is_int(owner) and name == "to_bytes":
            m.allow(_first(args, given, "length", 1), "int.to_bytes()")
        if m.depth >= m.budget.depth:
            raise m.over(f"calls nested more than {m.budget.depth} deep")
        m.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            m.depth -= 1
        return m.made(result)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        m = current()
        m.tick()
        _check_binop(m, operator, left, right)
        return m.made(super().call_binop(context, operator, left, right))

    def mlxllm_iter(self, iterable: Any) -> Any:
        m = current()
        for item in iterable:
            m.tick()
            yield item

    def mlxllm_made(self, value: Any) -> Any:
        return current().made(value)

    def mlxllm_concat(self, join: Any, pieces: tuple) -> Any:
        m = current()
        m.allow(sum(len(p) if isinstance(p, str) else m.size(p) for p in pieces), "a string")
        return m.made(join(pieces))

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """Joins the output of macros, ``{% set %}`` blocks and filter blocks."""
        m = current()
        parts, total = [], 0
        for piece in pieces:
            total += len(piece)
            if total > m.max_chars:
                raise m.over(f"output of more than {m.max_chars} characters")
            parts.append(piece)
        return m.made("".join(parts))
