"""The teacher's side of distillation, computed once per dataset and kept on disk: its top-k targets
(ids and log-probabilities, optionally final hidden states) in memory-mapped files under a folder
keyed by a hash of the teacher, tokenizer, data, ``k`` and ``T``, with a manifest of checksums (a
folder that fails its checks is rebuilt, never used); and for sequence-level distillation its greedy
continuations of the prompts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..files import replacing_dir, write_atomic
from .data import Dataset, Example

Progress = Callable[[str, int, int], None]  # (what, done, total)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlxllm" / "teacher-cache"


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
