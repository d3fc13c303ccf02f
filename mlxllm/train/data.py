"""Fine-tuning data: ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl``, tokenized with loss masks, and
length-bucketed padded batches.

A line is one of ``{"text": ...}``, ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}``
(one format per file). Prompt/completion pairs go through the chat template when the tokenizer has
one (as a user and an assistant turn, like mlx-lm), else they are concatenated. With ``mask_prompt``
only the completion / assistant tokens are scored; chat data masks by default. Every problem with a
line is found before training starts and reported with the file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import UserError

SPLITS = ("train", "valid", "test")
_FORMATS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}


@dataclass
class Example:
    """Token ids and, per token, whether predicting it is scored (the first token never is)."""

    tokens: list[int]
    scored: list[bool]


@dataclass
class Dataset:
    name: str
    examples: list[Example]
    truncated: int = 0  # examples cut to the maximum sequence length

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def scored_tokens(self) -> int:
        return sum(sum(e.scored) for e in self.examples)


def read_jsonl(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The records of one split and their format ('text', 'completion' or 'chat'); any malformed line
    is a ``UserError`` naming the file and line."""
    records, fmt = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        kind = next((k for k, fields in _FORMATS.items() if all(f in rec for f in fields)), None)
        if kind is None:
            raise UserError(f'{where}: expected "text", "prompt" and "completion", or "messages"; got keys {sorted(rec)}')
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            raise UserError(f"{where}: a {kind} record in a file of {fmt} records (one format per file)")
        _check_record(rec, kind, where)
        records.append(rec)
    if not records:
        raise UserError(f"{path} has no examples")
    return fmt, records


def _check_record(rec: dict[str, Any], kind: str, where: str) -> None:
    if kind == "chat":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f'{where}: "messages" must be a non-empty list')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f'{where}: message {i} needs string "role" and "content"')
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: no assistant message to learn from")
        return
    for field in _FORMATS[kind]:
        if not isinstance(rec[field], str):
            raise UserError(f'{where}: "{field}" must be a string')
    if not rec[_FORMATS[kind][-1]].strip():
        raise UserError(f'{where}: "{_FORMATS[kind][-1]}" is empty')


def _encode(tokenizer: Any, rec: dict[str, Any], kind: str, mask_prompt: bool) -> Example:
    eos = tokenizer.eos_token_id
    if kind == "completion" and tokenizer.has_chat_template:
        rec, kind = {"messages": [{"role": "user", "content": rec["prompt"]},
                                  {"role": "assistant", "content": rec["completion"]}]}, "chat"
    if kind == "text":
        tokens = tokenizer.encode(rec["text"]) + ([eos] if eos is not None else [])
        return Example(tokens, [False] + [True] * (len(tokens) - 1))
    if kind == "completion":
        prompt = tokenizer.encode(rec["prompt"])
        tokens = prompt + tokenizer.encode(rec["completion"], add_special_tokens=False) + ([eos] if eos is not None else [])
        start = len(prompt) if mask_prompt else 1
        return Example(tokens, [i >= start for i in range(len(tokens))])
    msgs = rec["messages"]
    tokens = tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True)
    if not mask_prompt:
        return Example(tokens, [False] + [True] * (len(tokens) - 1))
    scored = [False] * len(tokens)
    for i, m in enumerate(msgs):  # each assistant turn: from after its prompt to the end of the turn
        if m["role"] != "assistant":
            continue
        begin = len(tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=True))
        end = len(tokenizer.apply_chat_template(msgs[: i + 1], add_generation_prompt=False, tokenize=True))
        for j in range(max(begin, 1), min(end, len(tokens))):
            scored[j] = True
    return Example(tokens, scored)


def load_split(folder: Path, split: str, tokenizer: Any, max_seq_length: int, mask_prompt: bool | None = None) -> Dataset:
    """Tokenize ``folder/<split>.jsonl``; ``mask_prompt`` None means: mask for chat data, not otherwise."""
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found (the data folder needs {split}.jsonl)")
    kind, records = read_jsonl(path)
    return make_dataset(split, kind, records, tokenizer, max_seq_length, mask_prompt, str(path))


def make_dataset(name: str, kind: str, records: list[dict[str, Any]], tokenizer: Any, max_seq_length: int,
                 mask_prompt: bool | None = None, where: str = "") -> Dataset:
    """Tokenize ``records`` of one format (as ``read_jsonl`` returns them) into a ``Dataset``."""
    mask = (kind == "chat") if mask_prompt is None else mask_prompt
    examples, truncated = [], 0
    for n, rec in enumerate(records, 1):
        ex = _encode(tokenizer, rec, kind, mask)
        if len(ex.tokens) > max_seq_length:
            ex = Example(ex.tokens[:max_seq_length], ex.scored[:max_seq_length])
            truncated += 1
        if len(ex.tokens) < 2 or not any(ex.scored):
            raise UserError(f"{where or name}: example {n} has no token to learn from after tokenizing"
                            + (" and truncating" if len(ex.tokens) == max_seq_length else ""))
        examples.append(ex)
    return Dataset(name, examples, truncated)


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with (never scored): the tokenizer's pad token, else EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _pad(exs: list[Example], width: int, pad_id: int) -> Batch:
    tokens = np.full((len(exs), width), pad_id, np.int32)
    scored = np.zeros((len(exs), width), bool)
    for row, e in enumerate(exs):
        tokens[row, : len(e.tokens)] = e.tokens
        scored[row, : len(e.scored)] = e.scored
    return tokens, scored, np.array([len(e.tokens) for e in exs])


Batch = tuple[np.ndarray, ...]  # tokens [B, T], scored [B, T], lengths [B], then any extra arrays


Extra = Callable[[list[int], int], tuple[np.ndarray, ...]]  # (example indices, width) -> more batch arrays


def batches(data: Dataset, batch_size: int, seed: int, pad_id: int = 0, multiple: int = 32,
            extra: Extra | None = None) -> Iterator[Batch]:
    """Endless padded batches ``(tokens [B, T], scored [B, T], lengths [B], *extra)``: examples sorted by
    length and cut into batches (little padding), the batch order reshuffled each epoch from ``seed``.
    T is rounded up to ``multiple`` so a compiled step sees few distinct shapes. ``extra`` adds arrays
    per batch (distillation's teacher targets). Too few examples for one batch is a ``UserError`` here,
    before any batch is drawn."""
    if len(data) < batch_size:
        raise UserError(f"{data.name}.jsonl has {len(data)} examples, fewer than the batch size {batch_size}")
    order = sorted(range(len(data)), key=lambda i: len(data.examples[i].tokens))
    groups = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]

    def endless() -> Iterator[Batch]:
        epoch = 0
        while True:
            for g in np.random.default_rng([seed, epoch]).permutation(len(groups)):
                exs = [data.examples[i] for i in groups[g]]
                width = -(-max(len(e.tokens) for e in exs) // multiple) * multiple
                yield _pad(exs, width, pad_id) + (extra(groups[g], width) if extra else ())
            epoch += 1

    return endless()


def eval_batches(data: Dataset, batch_size: int, limit: int | None = None, pad_id: int = 0,
                 extra: Extra | None = None) -> list[Batch]:
    """A fixed list of batches covering the split in order (the first ``limit`` batches when given), for
    validation and test loss; the last batch may be smaller."""
    out = []
    for i in range(0, len(data), batch_size):
        if limit is not None and len(out) >= limit:
            break
        exs = data.examples[i : i + batch_size]
        width = max(len(e.tokens) for e in exs)
        out.append(_pad(exs, width, pad_id) + (extra(list(range(i, i + len(exs))), width) if extra else ()))
    return out
