"""Chat templates: the Jinja2 dialect Hugging Face templates are written in.

Templates come from model files, so they run in a sandbox with a budget (`sandbox.py`, `budget.py`):
a template that loops, recurses or grows without end stops with one error instead of hanging or
exhausting memory. The environment matches what `transformers` provides them: trim_blocks and
lstrip_blocks, loop controls, `{% generation %}` blocks, `raise_exception`, `strftime_now`, and a
`tojson` that keeps non-ASCII text as is (Jinja's own escapes HTML).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser

from . import budget as budgets
from .budget import Budget, ChatTemplateError
from .sandbox import BudgetedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError"]

# Real templates are a few kilobytes (the largest, with tool-calling, some tens); compiling one
# turns it into Python source several times longer.
MAX_TEMPLATE_CHARS = 2**20


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; rendering just keeps the body. Without it such templates do not compile."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> BudgetedEnvironment:
    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.meter_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile_error(where: str, err: BaseException) -> ChatTemplateError:
    if isinstance(err, TemplateSyntaxError):
        detail = f"line {err.lineno}: {err.message}"
    elif isinstance(err, RecursionError):
        detail = "nested too deeply"
    else:
        detail = f"{type(err).__name__}: {err}"
    return ChatTemplateError(f"the chat template in {where} does not compile ({detail})")


class ChatTemplate:
    """A compiled chat template; `where` (a file name) is what errors name."""

    def __init__(self, source: str, where: str = "the model's files") -> None:
        self.source = source
        self.where = where
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"the chat template in {where} is {len(source)} characters long (at most {MAX_TEMPLATE_CHARS})"
            )
        token = budgets.metering(budgets.Meter(budgets.RENDER))  # constant folding runs filters
        try:
            self._template = _environment().from_string(source)
        except Exception as err:  # a syntax error, or generated code Python cannot compile
            raise _compile_error(where, err) from None
        finally:
            budgets.reset(token)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, *, _budget: Budget | None = None,
        **variables: Any,
    ) -> str:
        """The template's text for `messages`; `ChatTemplateError` if it fails or runs past its budget
        (`budget.RENDER` unless `_budget` says otherwise)."""
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        budget = _budget or budgets.RENDER
        input_chars = budgets.Meter(budget).size(variables, limit=float("inf"))
        meter = budgets.Meter(budget, input_chars)
        token = budgets.metering(meter)
        try:
            out: list[str] = []
            total = 0
            for chunk in self._template.generate(**variables):
                total += len(chunk)
                if total > meter.max_chars:
                    raise meter.over(f"output of more than {meter.max_chars} characters")
                meter.tick(len(chunk))
                out.append(chunk)
            return "".join(out)
        except ChatTemplateError:
            raise
        except RecursionError:
            raise meter.over("recursion too deep") from None
        except MemoryError:
            raise meter.over("out of memory") from None
        except Exception as err:  # raise_exception(), an undefined name, a type error in the template
            message = (err.message if isinstance(err, TemplateError) else None) or f"{type(err).__name__}: {err}"
            raise ChatTemplateError(f"the chat template in {self.where} failed: {message}") from err
        finally:
            budgets.reset(token)

    def end_of_turn(self, candidates: Iterable[str], **variables: Any) -> str | None:
        """The special token the template writes right after an assistant message, if any.

        Found by rendering a tiny conversation rather than from a list of known names, so any
        template that closes turns with a special token (`<|im_end|>`, `<end_of_turn>`, ...) works.
        """
        marker = "mlxllm-end-of-turn-probe"
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = self.render(messages, add_generation_prompt=False, _budget=budgets.PROBE, **variables)
        except ChatTemplateError:  # templates may insist on fields or roles the probe does not have
            return None
        at = text.rfind(marker)
        if at < 0:
            return None
        rest = text[at + len(marker) :]
        matches = [c for c in candidates if c and rest.startswith(c)]
        return max(matches, key=len) if matches else None
