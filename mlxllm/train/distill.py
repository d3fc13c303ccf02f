"""``mlxllm distill``: train a student to imitate a teacher's next-token distributions, through the
same training loop as LoRA (``loop.Trainer`` with a distillation loss).

Loss per scored position: ``(1 - alpha) * T^2 * KL(p_T || q_T) + alpha * CE(data)``, where ``p_T``
and ``q_T`` are the teacher's and the student's distributions softened by the temperature ``T`` (the
``T^2`` keeps the soft term's gradient scale independent of ``T``). The teacher is kept sparse: its
``top_k`` most likely tokens with their log-probabilities, renormalisation-free, plus one explicit
"tail" bucket holding the rest of its mass, which the student's mass outside those tokens is matched
to. With ``top_k`` equal to the vocabulary this is the exact KL. An optional feature term adds the MSE
between the student's final hidden states (through a learned projection when the widths differ) and
the teacher's.

The teacher runs once per dataset (``teacher.py``: its targets are cached on disk and checked).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from ..files import write_atomic
from .data import Dataset, Example, batches, eval_batches, make_dataset, pad_id, read_jsonl
from .loop import NonFiniteLoss, TrainConfig, Trainer, load_trainable, step_metadata
from .teacher import Progress, cache_key, default_cache_dir, teacher_completions, teacher_identity, teacher_targets


@dataclass
class DistillOptions:
    data: Path
    out: Path
    temperature: float = 2.0
    alpha: float = 0.5
    top_k: int = 64
    teacher_cache: Path | None = None  # default: ~/.cache/mlxllm/teacher-cache
    feature_loss: str | None = None  # "hidden:mse" or "hidden:mse:WEIGHT"
    seq_level: int = 0  # tokens the teacher writes per training prompt (0: off)
    lora_rank: int = 0  # train LoRA adapters on the student instead of all its weights
    max_seq_length: int = 512
    mask_prompt: bool | None = None
    resume: bool = False
    train: bool = True
    eval: bool = False
    eval_batches: int = -1
    train_config: TrainConfig = field(default_factory=TrainConfig)


def feature_weight(spec: str | None) -> float:
    """``hidden:mse[:weight]`` -> the weight (0 when the option is off)."""
    if spec is None:
        return 0.0
    parts = spec.lower().split(":")
    if parts[:2] != ["hidden", "mse"] or len(parts) > 3:
        raise UserError(f"--feature-loss takes hidden:mse or hidden:mse:WEIGHT, got {spec}")
    try:
        weight = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise UserError(f"--feature-loss {spec}: the weight must be a number") from None
    if not weight > 0:
        raise UserError(f"--feature-loss {spec}: the weight must be positive")
    return weight


def check(opts: DistillOptions, teacher_tokenizer: Any, student_tokenizer: Any, vocab: int) -> None:
    if not (opts.temperature > 0 and math.isfinite(opts.temperature)):
        raise UserError(f"--temperature must be a positive number, got {opts.temperature}")
    if not 0 <= opts.alpha <= 1:
        raise UserError(f"--alpha must be in [0, 1], got {opts.alpha}")
    if not 1 <= opts.top_k <= vocab:
        raise UserError(f"--top-k must be in 1..{vocab} (the vocabulary), got {opts.top_k}")
    if opts.seq_level < 0 or opts.lora_rank < 0:
        raise UserError("--seq-level and --lora-rank must be >= 0")
    if opts.max_seq_length < 2:
        raise UserError(f"--max-seq-length must be at least 2, got {opts.max_seq_length}")
    if teacher_tokenizer.fingerprint != student_tokenizer.fingerprint:
        raise UserError("the teacher and the student have different tokenizers; distillation matches their "
                        "distributions token by token, so they must share one")
    feature_weight(opts.feature_loss)
    if opts.train:
        opts.train_config.check()
    if not (opts.train or opts.eval):
        raise UserError("nothing to do: pass --train and/or --eval")


# --- data ----------------------------------------------------------------------------------------

def load_data(path: Path, tokenizer: Any, max_seq_length: int, mask_prompt: bool | None,
              splits: tuple[str, ...]) -> dict[str, tuple[Dataset, str, list[dict[str, Any]]]]:
    """``(dataset, format, records)`` per split: from ``train/valid/test.jsonl`` in a folder (a missing
    test split falls back to valid), or from one jsonl file of which every 10th record is held out as
    valid (and test)."""
    path = Path(path)
    raw: dict[str, tuple[str, list[dict[str, Any]], str]] = {}
    if path.is_dir():
        for split in splits:
            f = path / f"{split}.jsonl"
            if split == "test" and not f.is_file():
                f = path / "valid.jsonl"
            if not f.is_file():
                raise UserError(f"{f} not found (the data folder needs train.jsonl and valid.jsonl)")
            kind, records = read_jsonl(f)
            raw[split] = (kind, records, str(f))
    elif path.is_file():
        kind, records = read_jsonl(path)
        if len(records) < 2:
            raise UserError(f"{path} needs at least 2 examples (every 10th is held out for validation)")
        held = [r for i, r in enumerate(records) if i % 10 == 9] or records[-1:]
        train = [r for i, r in enumerate(records) if i % 10 != 9] if len(records) >= 10 else records[:-1]
        for split in splits:
            raw[split] = (kind, train if split == "train" else held, str(path))
    else:
        raise UserError(f"--data {path}: no such folder or file")
    return {s: (make_dataset(s, kind, recs, tokenizer, max_seq_length, mask_prompt, where), kind, recs)
            for s, (kind, recs, where) in raw.items()}


def _prompt_ids(tokenizer: Any, rec: dict[str, Any], kind: str, example: Example) -> list[int]:
    """What the teacher continues in sequence-level mode: the prompt (chat: every turn before the last
    assistant turn), or for plain text its first quarter (up to 64 tokens)."""
    if kind == "text":
        return example.tokens[: max(1, min(64, len(example.tokens) // 4))]
    if kind == "completion":
        if tokenizer.has_chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=True)
        return tokenizer.encode(rec["prompt"])
    msgs = rec["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(msgs[:last], add_generation_prompt=True, tokenize=True)


# --- the loss ---------------------------------------------------------------------------------------

class Distilled(nn.Module):
    """What the loop trains: the student, and the projection of its hidden states onto the teacher's
    width for the feature term (absent when the widths match or the term is off)."""

    def __init__(self, student: nn.Module, teacher_width: int | None):
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        if teacher_width is not None and teacher_width != width:
            self.proj = nn.Linear(width, teacher_width, bias=False)

    @property
    def layers(self) -> list:  # for loop.checkpointed_blocks
        return self.student.layers


def sparse_kl(teacher_ids: mx.array, teacher_lps: mx.array, student_lps: mx.array) -> mx.array:
    """KL(teacher || student) per position, from the teacher's top-k ``(ids, log-probabilities)`` and
    the student's full log-probabilities; the teacher's remaining mass and the student's mass outside
    the teacher's top-k form one extra bucket each."""
    lq = mx.take_along_axis(student_lps, teacher_ids, axis=-1)
    p = mx.exp(teacher_lps)
    p_tail = mx.maximum(1.0 - p.sum(axis=-1), 0.0)
    q_tail = mx.maximum(1.0 - mx.exp(lq).sum(axis=-1), 1e-12)
    tail = mx.where(p_tail > 1e-7, p_tail * (mx.log(mx.maximum(p_tail, 1e-12)) - mx.log(q_tail)), 0.0)
    return (p * (teacher_lps - lq)).sum(axis=-1) + tail


def distill_loss(temperature: float, alpha: float, hidden_weight: float = 0.0) -> Callable[..., tuple[mx.array, mx.array]]:
    """The loop's loss: ``(model, tokens, scored, teacher_ids, teacher_logprobs[, teacher_hidden])``."""

    def loss(model: Distilled, tokens: mx.array, scored: mx.array, t_ids: mx.array, t_lps: mx.array,
             t_hidden: mx.array | None = None) -> tuple[mx.array, mx.array]:
        student = model.student
        h = student.hidden(tokens[:, :-1])
        logits = student.head(h).astype(mx.float32)
        mask = scored[:, 1:].astype(mx.float32)
        n = mask.sum()
        per = mx.zeros_like(mask)
        if alpha > 0:
            per = per + alpha * nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
        if alpha < 1:
            soft = logits / temperature
            soft = soft - mx.logsumexp(soft, axis=-1, keepdims=True)
            per = per + (1 - alpha) * temperature**2 * sparse_kl(t_ids, t_lps, soft)
        if hidden_weight and t_hidden is not None:
            mapped = model.proj(h) if "proj" in model else h
            per = per + hidden_weight * ((mapped.astype(mx.float32) - t_hidden.astype(mx.float32)) ** 2).mean(axis=-1)
        return (per * mask).sum() / mx.maximum(n, 1.0), n

    return loss


# --- evaluation ---------------------------------------------------------------------------------------

def compare(teacher: Any, student: Any, data: Dataset, batch_size: int = 4, limit: int | None = None) -> dict[str, float]:
    """Student against teacher on held-out data, over the scored positions: top-1 agreement, KL(teacher ||
    student) at temperature 1 over the whole vocabulary, and both perplexities on the data."""
    agree = kl = nll_s = nll_t = count = 0.0
    for tokens, scored, _ in eval_batches(data, batch_size, limit):
        x, y = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])
        mask = mx.array(scored[:, 1:]).astype(mx.float32)
        lt = teacher(x).astype(mx.float32)
        ls = student(x).astype(mx.float32)
        lt = lt - mx.logsumexp(lt, axis=-1, keepdims=True)
        ls = ls - mx.logsumexp(ls, axis=-1, keepdims=True)
        same = (mx.argmax(lt, axis=-1) == mx.argmax(ls, axis=-1)).astype(mx.float32)
        div = (mx.exp(lt) * (lt - ls)).sum(axis=-1)
        pick = lambda lp: -mx.take_along_axis(lp, y[..., None], axis=-1)[..., 0]  # noqa: E731
        parts = [(v * mask).sum() for v in (same, div, pick(ls), pick(lt))] + [mask.sum()]
        mx.eval(parts)
        a, d, s, t, c = (p.item() for p in parts)
        agree, kl, nll_s, nll_t, count = agree + a, kl + d, nll_s + s, nll_t + t, count + c
    count = max(count, 1.0)
    return {"top1_agreement": agree / count, "kl": kl / count, "student_perplexity": math.exp(nll_s / count),
            "teacher_perplexity": math.exp(nll_t / count), "tokens": int(count)}


# --- the run ---------------------------------------------------------------------------------------

CHECKPOINT = "checkpoint"
WEIGHTS = "trainable.safetensors"



def run(teacher: Any, tokenizer: Any, teacher_path: Path, student: Any, student_tokenizer: Any,
        opts: DistillOptions, save_student: Callable[[Any], None],
        report: Callable[[dict[str, Any]], None] = lambda r: None, progress: Progress = lambda *a: None,
        warn: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` as ``opts`` says; ``save_student(model)`` writes the student
    as a model folder (the CLI passes one that keeps ``out/checkpoint``). Returns the figures."""
    from ..model import adapters as A

    check(opts, tokenizer, student_tokenizer, teacher.config.vocab_size)
    cfg = opts.train_config
    splits = (("train", "valid") if opts.train else ()) + (("test",) if opts.eval else ())
    data = load_data(opts.data, tokenizer, opts.max_seq_length, opts.mask_prompt, splits)
    for d, _, _ in data.values():
        if d.truncated:
            warn(f"{d.truncated} of {len(d)} {d.name} examples are longer than --max-seq-length "
                 f"{opts.max_seq_length} and were truncated")
    out: dict[str, Any] = {"out": str(opts.out), "teacher_layers": len(teacher.layers),
                           "student_layers": len(student.layers)}
    held_out = data["test"][0] if opts.eval else None
    limit = None if opts.eval_batches < 0 else opts.eval_batches
    teacher.eval()
    if held_out is not None:  # "eval" alone; "before" and "after" around training
        when = "before" if opts.train else "eval"
        student.eval()
        out[when] = compare(teacher, student, held_out, cfg.batch_size, limit)
        report({"eval": when, **out[when]})
    if not opts.train:
        return out
    cache_dir = Path(opts.teacher_cache) if opts.teacher_cache else default_cache_dir()
    teacher_id = teacher_identity(teacher_path)
    train, kind, records = data["train"]
    if opts.seq_level:
        key = hashlib.sha256(json.dumps([teacher_id, tokenizer.fingerprint, opts.seq_level, records]).encode()).hexdigest()[:24]
        prompts = [_prompt_ids(tokenizer, r, kind, e) for r, e in zip(records, train.examples)]
        extra = teacher_completions(teacher, tokenizer, prompts, opts.seq_level, cache_dir, key, progress)
        train = Dataset("train", train.examples + [Example(e.tokens[: opts.max_seq_length], e.scored[: opts.max_seq_length])
                                                   for e in extra], train.truncated)
        out["teacher_completions"] = len(extra)
    weight = feature_weight(opts.feature_loss)
    targets, cached = {}, {}
    for name, d in (("train", train), ("valid", data["valid"][0])):
        key = cache_key(teacher_id, tokenizer.fingerprint, d, opts.top_k, opts.temperature, weight > 0)
        targets[name], cached[name] = teacher_targets(teacher, d, cache_dir, key, opts.top_k, opts.temperature,
                                                      weight > 0, progress, warn)
    out["teacher_cache"] = {"folder": str(cache_dir), "reused": all(cached.values())}
    wrapper = Distilled(student, teacher.config.hidden_size if weight else None)
    if opts.lora_rank:
        student.freeze()
        keys = A.target_keys(student, list(A.TARGETS), len(student.layers))
        mx.random.seed(cfg.seed)
        A.apply_adapters(student, len(student.layers), keys, opts.lora_rank, 2.0)
    mx.eval(wrapper.parameters())
    trainer = Trainer(wrapper, cfg, distill_loss(opts.temperature, opts.alpha, weight))
    checkpoint = Path(opts.out) / CHECKPOINT
    if opts.resume:
        _resume(wrapper, trainer, checkpoint)
    out["trainable_parameters"] = sum(v.size for _, v in tree_flatten(wrapper.trainable_parameters()))
    out["start_step"] = trainer.step

    def save() -> None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        write_atomic(checkpoint / WEIGHTS, lambda p: mx.save_safetensors(
            str(p), dict(tree_flatten(wrapper.trainable_parameters())), metadata=step_metadata(trainer.step)))
        trainer.save(checkpoint)

    pad = pad_id(tokenizer)
    train_batches = batches(train, cfg.batch_size, cfg.seed, pad, extra=targets["train"].batch)
    val = eval_batches(data["valid"][0], cfg.batch_size, None if cfg.val_batches < 0 else cfg.val_batches, pad,
                       extra=targets["valid"].batch)
    ruined = False
    try:
        out["reports"] = trainer.run(train_batches, val, save, report)
    except NonFiniteLoss:
        ruined = True  # the checkpoint and any student written before stay as they were
        raise
    finally:  # also on Ctrl-C: the student as it is, as a usable model folder
        if not ruined:
            final = A.fuse(student) if opts.lora_rank else student
            save_student(final)
    out["steps"] = trainer.step
    out["train_examples"] = len(train)
    if held_out is not None:
        final.eval()
        out["after"] = compare(teacher, final, held_out, cfg.batch_size, limit)
        report({"eval": "after", **out["after"]})
    return out


def _resume(wrapper: Distilled, trainer: Trainer, folder: Path) -> None:
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise UserError(f"--resume: no checkpoint in {folder}")
    step = load_trainable(wrapper, weights, f"the --resume checkpoint {weights}",
                          "this student (other student, --student-init, --lora-rank or --feature-loss?)")
    if not trainer.restore(folder, step):
        raise UserError(f"--resume: {folder} has no training state")
