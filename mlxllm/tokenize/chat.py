"""Chat templates: the Jinja2 dialect Hugging Face templates are written in.

Templates come from model files, so they run in a sandbox. The environment matches what
`transformers` provides them: trim_blocks/lstrip_blocks, loop controls, `{% generation %}`
blocks, `raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII text as is
(Jinja's own escapes HTML).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


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


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._template = _environment().from_string(source)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, **variables: Any) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def end_of_turn(self, candidates: Iterable[str], **variables: Any) -> str | None:
        """The special token the template writes right after an assistant message, if any.

        Found by rendering a tiny conversation rather than from a list of known names, so any
        template that closes turns with a special token (`<|im_end|>`, `<end_of_turn>`, ...) works.
        """
        marker = "mlxllm-end-of-turn-probe"
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = self.render(messages, add_generation_prompt=False, **variables)
        except Exception:  # templates may insist on fields or roles the probe does not have
            return None
        at = text.rfind(marker)
        if at < 0:
            return None
        rest = text[at + len(marker) :]
        matches = [c for c in candidates if c and rest.startswith(c)]
        return max(matches, key=len) if matches else None
