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

The teacher runs once per dataset: its top-k ids and log-probabilities (and hidden states for the
feature term) go to memory-mapped files in a cache folder keyed by a hash of the teacher, tokenizer,
data, ``k`` and ``T``, with a manifest of checksums; later epochs and runs read them, and a cache
that fails its checks is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import UserError
from ..files import replacing_dir, write_atomic
from .data import Dataset, Example, batches, eval_batches, make_dataset, pad_id, read_jsonl
from .loop import TrainConfig, Trainer, load_trainable

Progress = Callable[[str, int, int], None]  # (what, done, total)


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


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlxllm" / "teacher-cache"


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


def teacher_completions(teacher: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int, cache_dir: Path,
                        key: str, progress: Progress) -> list[Example]:
    """Sequence-level distillation data: the teacher's greedy continuation of each prompt (up to
    ``new_tokens``, ending at EOS), scored on the continuation only; kept in the cache folder."""
    from ..engine.steps import generate_step

    path = cache_dir / f"completions-{key}.json"
    outs = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key and len(saved["completions"]) == len(prompts):
                outs = saved["completions"]
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: generate again
    if outs is None:
        eos = set(tokenizer.eos_token_ids)
        outs = []
        for i, p in enumerate(prompts):
            out = []
            for t, _ in generate_step(mx.array(p, dtype=mx.int32), teacher, max_tokens=new_tokens):
                out.append(t)
                if t in eos:
                    break
            outs.append(out)
            progress("teacher writing completions", i + 1, len(prompts))
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": key, "completions": outs}))
    return [Example(p + c, [i >= len(p) for i in range(len(p) + len(c))]) for p, c in zip(prompts, outs)]


# --- the teacher cache -------------------------------------------------------------------------------

def teacher_identity(path: Path) -> str:
    """Names the teacher's weights: the file (or the model folder's files) with sizes and times."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".gguf"))
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cache_key(teacher_id: str, tokenizer_fingerprint: str, data: Dataset, top_k: int, temperature: float,
              hidden: bool) -> str:
    h = hashlib.sha256(json.dumps([teacher_id, tokenizer_fingerprint, top_k, temperature, hidden]).encode())
    for e in data.examples:
        h.update(np.asarray(e.tokens, np.int32).tobytes() + b"|")
    return h.hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class TeacherTargets:
    """One split's teacher outputs, memory-mapped: for example ``i``, positions
    ``offsets[i]:offsets[i + 1]`` (one per predicted token) of ``ids``/``logprobs`` ``[P, k]`` and,
    with the feature term, ``hidden [P, D]`` (float16)."""

    FILES = ("offsets.npy", "ids.npy", "logprobs.npy", "hidden.npy")

    def __init__(self, folder: Path):
        self.folder = folder
        self.offsets = np.load(folder / "offsets.npy")
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")
        self.logprobs = np.load(folder / "logprobs.npy", mmap_mode="r")
        self.hidden = np.load(folder / "hidden.npy", mmap_mode="r") if (folder / "hidden.npy").exists() else None

    def batch(self, indices: list[int], width: int) -> tuple[np.ndarray, ...]:
        """Padded ``[B, width - 1, ...]`` arrays for a batch whose tokens are ``[B, width]`` (padding: id 0
        with log-probability 0, finite and masked out by the loss)."""
        k = self.ids.shape[1]
        ids = np.zeros((len(indices), width - 1, k), np.int32)
        lps = np.zeros((len(indices), width - 1, k), np.float32)
        hid = None if self.hidden is None else np.zeros((len(indices), width - 1, self.hidden.shape[1]), np.float16)
        for row, i in enumerate(indices):
            a, b = self.offsets[i], self.offsets[i + 1]
            ids[row, : b - a] = self.ids[a:b]
            lps[row, : b - a] = self.logprobs[a:b]
            if hid is not None:
                hid[row, : b - a] = self.hidden[a:b]
        return (ids, lps) if hid is None else (ids, lps, hid)


def _verify(folder: Path) -> str | None:
    """Why the cache in ``folder`` cannot be used, or None when it checks out."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        for name, digest in manifest["sha256"].items():
            if _sha256(folder / name) != digest:
                return f"{name} does not match its checksum"
        TeacherTargets(folder)
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({e})"
    return None


def build_targets(teacher: Any, data: Dataset, folder: Path, top_k: int, temperature: float, hidden: bool,
                  progress: Progress, batch_size: int = 4) -> TeacherTargets:
    """Run the teacher over ``data`` once and write its top-k targets to ``folder`` (atomically)."""
    with replacing_dir(folder) as tmp:
        _write_targets(teacher, data, tmp, top_k, temperature, hidden, progress, batch_size)
    return TeacherTargets(folder)


def _write_targets(teacher: Any, data: Dataset, tmp: Path, top_k: int, temperature: float, hidden: bool,
                   progress: Progress, batch_size: int) -> None:
    sizes = [len(e.tokens) - 1 for e in data.examples]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.int32, (total, top_k))
    lps = np.lib.format.open_memmap(tmp / "logprobs.npy", "w+", np.float32, (total, top_k))
    dim = teacher.config.hidden_size
    hid = np.lib.format.open_memmap(tmp / "hidden.npy", "w+", np.float16, (total, dim)) if hidden else None
    done = 0
    for start in range(0, len(data), batch_size):
        exs = data.examples[start : start + batch_size]
        width = max(len(e.tokens) for e in exs)
        tokens = np.zeros((len(exs), width), np.int32)
        for r, e in enumerate(exs):
            tokens[r, : len(e.tokens)] = e.tokens
        h = teacher.hidden(mx.array(tokens[:, :-1]))
        logits = teacher.head(h).astype(mx.float32) / temperature
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        top = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., :top_k] if top_k < logprobs.shape[-1] else (
            mx.broadcast_to(mx.arange(top_k), logprobs.shape))
        vals = mx.take_along_axis(logprobs, top, axis=-1)
        mx.eval(top, vals, h)
        top_np, vals_np = np.array(top), np.array(vals)
        h_np = np.array(h.astype(mx.float16)) if hidden else None
        for r, e in enumerate(exs):
            a, b = offsets[start + r], offsets[start + r + 1]
            ids[a:b] = top_np[r, : b - a]
            lps[a:b] = vals_np[r, : b - a]
            if hid is not None:
                hid[a:b] = h_np[r, : b - a]
        done += len(exs)
        progress(f"teacher targets ({data.name})", done, len(data))
    for arr in (ids, lps, hid):
        if arr is not None:
            arr.flush()
    del ids, lps, hid
    np.save(tmp / "offsets.npy", offsets)
    names = [n for n in TeacherTargets.FILES if (tmp / n).exists()]
    manifest = {"examples": len(data), "positions": total, "top_k": top_k, "temperature": temperature,
                "sha256": {n: _sha256(tmp / n) for n in names}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def teacher_targets(teacher: Any, data: Dataset, cache_dir: Path, key: str, top_k: int, temperature: float,
                    hidden: bool, progress: Progress, warn: Callable[[str], None]) -> tuple[TeacherTargets, bool]:
    """The cached targets for ``data`` (verified), built when missing; a cache that fails verification is
    reported and rebuilt. Returns the targets and whether they came from the cache."""
    folder = cache_dir / key
    if folder.exists():
        problem = _verify(folder)
        if problem is None:
            return TeacherTargets(folder), True
        warn(f"teacher cache {folder} is corrupt ({problem}); rebuilding it")
    return build_targets(teacher, data, folder, top_k, temperature, hidden, progress), False


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
            str(p), dict(tree_flatten(wrapper.trainable_parameters()))))
        trainer.save(checkpoint)

    pad = pad_id(tokenizer)
    train_batches = batches(train, cfg.batch_size, cfg.seed, pad, extra=targets["train"].batch)
    val = eval_batches(data["valid"][0], cfg.batch_size, None if cfg.val_batches < 0 else cfg.val_batches, pad,
                       extra=targets["valid"].batch)
    try:
        out["reports"] = trainer.run(train_batches, val, save, report)
    finally:  # also on Ctrl-C: the student as it is, as a usable model folder
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
    load_trainable(wrapper, weights, f"the --resume checkpoint {weights}",
                   "this student (other student, --student-init, --lora-rank or --feature-loss?)")
    if not trainer.restore(folder):
        raise UserError(f"--resume: {folder} has no training state")
