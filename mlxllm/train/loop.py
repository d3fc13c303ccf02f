"""The training loop fine-tuning and distillation share: a compiled gradient step, AdamW with an
optional warmup + cosine schedule, gradient clipping and accumulation, periodic validation, atomic
checkpoints that carry the optimizer state and step (the data order and dropout draws are functions of
the seed and step, so a resumed run continues exactly as an uninterrupted one), and a final checkpoint
on Ctrl-C.

Only trainable parameters (the adapters) get gradients and optimizer state; the frozen base,
quantized or not, is read as it is.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .. import backend
from ..errors import UserError
from ..files import write_atomic
from ..model.cache import SharedKV
from ..model.moe import ExpertMLPs
from .data import Batch

STATE_FILE = "training_state.safetensors"
STATE_INFO = "training_state.json"
STEP_KEY = "mlxllm_step"  # safetensors metadata: the step a trainable-weights file was saved at


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: the weights are ruined, so nothing is saved."""


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 4
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine" (to 0 at ``iters``)
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int = 25  # -1: the whole validation split
    save_every: int = 100
    seed: int = 0
    grad_checkpoint: bool = False

    def check(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("iters", "batch_size", "grad_accumulation", "steps_per_report", "steps_per_eval", "save_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.seed < 2**64:
            raise UserError(f"--seed must be an integer from 0 to 2^64 - 1, got {self.seed}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule}")
        if not 0 <= self.warmup < self.iters:
            raise UserError(f"--warmup must be in 0..{self.iters - 1}, got {self.warmup}")


def token_loss(model: nn.Module, tokens: mx.array, scored: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy of the scored next tokens, and how many there are."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    mask = scored[:, 1:].astype(mx.float32)
    n = mask.sum()
    return (ce * mask).sum() / mx.maximum(n, 1.0), n


def schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array] | float:
    if cfg.lr_schedule == "constant" and not cfg.warmup:
        return cfg.learning_rate
    main = (optim.cosine_decay(cfg.learning_rate, cfg.iters - cfg.warmup) if cfg.lr_schedule == "cosine"
            else (lambda step: mx.array(cfg.learning_rate)))
    if not cfg.warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(cfg.learning_rate / cfg.warmup, cfg.learning_rate, cfg.warmup - 1),
                                 main], [cfg.warmup])


def evaluate(model: nn.Module, batches: list[Batch],
             loss: Callable[..., tuple[mx.array, mx.array]] = token_loss) -> float:
    """Token-weighted mean loss over ``batches``, without gradients and with dropout off (the model
    is left in eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for tokens, scored, _, *extra in batches:
        value, n = loss(model, mx.array(tokens), mx.array(scored), *map(mx.array, extra))
        mx.eval(value, n)
        total += value.item() * n.item()
        count += int(n.item())
    return total / max(count, 1)


@contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Recompute each block's activations in the backward pass instead of keeping them (less memory,
    about a third more compute) while the context is open."""
    cls = type(model.layers[0])
    plain = cls.__call__

    def call(block: nn.Module, x: mx.array, mask: Any, cache: Any, per_layer: mx.array | None = None,
             keep: list | None = None) -> mx.array:
        if keep is not None or isinstance(cache, SharedKV):  # keys and values handed between layers (Gemma 4)
            return plain(block, x, mask, cache, per_layer, keep)

        def inner(params: Any, x: mx.array, *extra: mx.array) -> mx.array:
            block.update(params)
            return plain(block, x, mask, cache, *extra)

        return mx.checkpoint(inner)(block.trainable_parameters(), x, *([] if per_layer is None else [per_layer]))

    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = plain


def step_metadata(step: int) -> dict[str, str]:
    """The safetensors metadata of trainable weights saved at ``step`` (checked against the training
    state on resume, so a save interrupted between the two files is caught)."""
    return {"format": "mlx", STEP_KEY: str(step)}


def load_trainable(model: nn.Module, weights: Path, what: str, differs: str) -> int | None:
    """Load saved trainable tensors into ``model`` after checking they are exactly its trainable ones
    (names and shapes); ``what`` names the file in errors, ``differs`` says what may not match.
    Returns the step the file was saved at (None for files from elsewhere, e.g. mlx-lm's)."""
    try:
        saved, metadata = mx.load(str(weights), return_metadata=True)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot read {what}: {e}") from None
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in saved):
        odd = sorted(set(saved) ^ set(expected)) or [k for k in saved if saved[k].shape != expected[k].shape]
        raise UserError(f"{what} does not fit {differs}, e.g. {odd[0]}")
    model.load_weights(list(saved.items()), strict=False)
    step = metadata.get(STEP_KEY)
    return int(step) if step is not None and step.isdigit() else None


class Trainer:
    """Owns the optimizer and the step count; ``run`` trains, ``evaluate`` scores batches without
    gradients, ``save`` / ``restore`` move the whole training state through a folder."""

    def __init__(self, model: nn.Module, cfg: TrainConfig,
                 loss: Callable[..., tuple[mx.array, mx.array]] = token_loss):
        """``loss(model, tokens, scored, *extra) -> (mean loss, scored count)``; ``extra`` are the batch's
        arrays after ``lengths`` (distillation's teacher targets)."""
        cfg.check()
        self.model, self.cfg, self.loss = model, cfg, loss
        self.optimizer = optim.AdamW(learning_rate=schedule(cfg), weight_decay=cfg.weight_decay)
        self.step = 0
        self.tokens_seen = 0
        grad = nn.value_and_grad(model, loss)
        state = [model.state, mx.random.state]

        def micro(tokens: mx.array, scored: mx.array, *extra: mx.array) -> tuple[mx.array, mx.array, Any]:
            (value, n), grads = grad(model, tokens, scored, *extra)
            return value, n, tree_map(lambda g: g * n, grads)  # summed over tokens, for exact accumulation

        # On the CPU backend experts run per expert, grouped on the host, which a compiled step cannot do.
        host_grouped = backend.device_name() == "cpu" and any(isinstance(m, ExpertMLPs) for _, m in model.named_modules())
        self._micro = micro if host_grouped else partial(mx.compile, inputs=state, outputs=state)(micro)

    def _update(self, batches: list[Batch]) -> tuple[float, int]:
        """One optimizer step over ``batches`` (gradient accumulation): token-weighted mean loss and tokens."""
        total, count, acc = 0.0, 0, None
        # dropout draws: a function of (seed, step), so a resumed run redraws the same ones
        mx.random.seed(self.cfg.seed * 1_000_003 + self.step)
        for tokens, scored, lengths, *extra in batches:
            value, n, grads = self._micro(mx.array(tokens), mx.array(scored), *map(mx.array, extra))
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            mx.eval(value, n, acc)
            total += value.item() * n.item()
            count += int(n.item())
            self.tokens_seen += int(lengths.sum())
        grads = tree_map(lambda g: g / max(count, 1), acc)
        if self.cfg.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step += 1
        return total / max(count, 1), count

    def evaluate(self, batches: list[Batch]) -> float:
        loss = evaluate(self.model, batches, self.loss)
        self.model.train()
        return loss

    def run(self, train: Iterator[Batch], val: list[Batch] | None, save: Callable[[], None],
            report: Callable[[dict[str, Any]], None] = lambda r: None) -> list[dict[str, Any]]:
        """Train from ``self.step`` to ``cfg.iters``; ``train`` yields micro-batches from the start of the
        data order (those a restored run has used are skipped). ``save`` is called every ``save_every``
        steps, at the end and on Ctrl-C (then KeyboardInterrupt propagates). Returns the reports."""
        cfg, reports = self.cfg, []
        for _ in range(self.step * cfg.grad_accumulation):
            next(train)
        self.model.train()
        window_loss = window_scored = 0.0
        window_start, window_tokens = time.perf_counter(), self.tokens_seen
        mx.reset_peak_memory()
        try:
            with checkpointed_blocks(self.model) if cfg.grad_checkpoint else nullcontext():
                if val is not None and self.step == 0:
                    reports.append(self._report(report, val_loss=self.evaluate(val)))
                while self.step < cfg.iters:
                    loss, n = self._update([next(train) for _ in range(cfg.grad_accumulation)])
                    if not math.isfinite(loss):
                        raise NonFiniteLoss(f"the training loss became {loss} at step {self.step}; stopped without "
                                            "saving (the last checkpoint is kept): lower --learning-rate?")
                    window_loss += loss * n
                    window_scored += n
                    reported = self.step % cfg.steps_per_report == 0 or self.step == cfg.iters
                    if reported:  # tokens/s counts every input token (padding excluded), as mlx-lm does
                        dt = time.perf_counter() - window_start
                        steps = (self.step - 1) % cfg.steps_per_report + 1
                        reports.append(self._report(report, train_loss=window_loss / max(window_scored, 1),
                                                    tokens_per_s=(self.tokens_seen - window_tokens) / dt,
                                                    iters_per_s=steps / dt))
                    if val is not None and (self.step % cfg.steps_per_eval == 0 or self.step == cfg.iters):
                        reports.append(self._report(report, val_loss=self.evaluate(val)))
                    if self.step % cfg.save_every == 0 and self.step < cfg.iters:
                        save()
                    if reported:  # the next window starts after validation and saving
                        window_loss = window_scored = 0.0
                        window_start, window_tokens = time.perf_counter(), self.tokens_seen
        except KeyboardInterrupt:
            save()
            raise
        save()
        return reports

    def _report(self, report: Callable[[dict[str, Any]], None], **fields: Any) -> dict[str, Any]:
        lr = self.optimizer.learning_rate
        r = {"step": self.step, "learning_rate": float(lr.item() if isinstance(lr, mx.array) else lr),
             "tokens": self.tokens_seen, "peak_memory_gb": mx.get_peak_memory() / 1e9, **fields}
        report(r)
        return r

    def save(self, folder: Path) -> None:
        """The optimizer state and step beside the adapters, each file written atomically."""
        arrays = {f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)}
        write_atomic(folder / STATE_FILE, lambda p: mx.save_safetensors(str(p), arrays))
        info = {"step": self.step, "tokens": self.tokens_seen, "config": asdict(self.cfg)}
        write_atomic(folder / STATE_INFO, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))

    def restore(self, folder: Path, weights_step: int | None = None) -> bool:
        """Continue from the training state saved in ``folder`` (False when there is none: the adapters
        alone were given, so training restarts its step count). ``weights_step`` is the step the
        weights being resumed were saved at; a state of another step is refused."""
        state, info = folder / STATE_FILE, folder / STATE_INFO
        if not (state.is_file() and info.is_file()):
            return False
        try:
            saved = json.loads(info.read_text())
            arrays = mx.load(str(state))
        except (ValueError, RuntimeError) as e:
            raise UserError(f"cannot read the training state in {folder}: {e}") from None
        opt = tree_unflatten([(k[len("optimizer."):], v) for k, v in arrays.items() if k.startswith("optimizer.")])
        self.optimizer.init(self.model.trainable_parameters())
        expected = dict(tree_flatten(self.optimizer.state))
        got = dict(tree_flatten(opt))
        if set(expected) != set(got) or any(expected[k].shape != got[k].shape for k in expected):
            raise UserError(f"the training state in {folder} does not match these adapters (different model or settings?)")
        self.optimizer.state = opt
        self.step, self.tokens_seen = int(saved["step"]), int(saved.get("tokens", 0))
        if weights_step is not None and weights_step != self.step:
            raise UserError(f"{folder}: the weights were saved at step {weights_step} but the training state at "
                            f"step {self.step} (an interrupted save); move {STATE_FILE} aside to resume from the "
                            "weights alone")
        if self.step > self.cfg.iters:
            raise UserError(f"{folder} was saved at step {self.step}, past --iters {self.cfg.iters}")
        return True

