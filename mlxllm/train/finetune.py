"""``mlxllm lora``: everything between the command line and the training loop. All input is checked
(arguments, data files line by line, targets, a resumed adapter's fit) before anything is written, so
bad input never overwrites a saved adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from ..model import adapters as A
from .data import batches, eval_batches, load_split, pad_id
from .loop import TrainConfig, Trainer, evaluate, load_trainable, step_metadata


@dataclass
class LoraOptions:
    data: Path
    adapter_path: Path = Path("adapters")
    train: bool = False
    test: bool = False
    max_seq_length: int = 2048
    mask_prompt: bool | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: int | None = 16  # None: all
    targets: list[str] = field(default_factory=lambda: list(A.TARGETS))
    dora: bool = False
    resume_adapter_file: Path | None = None
    force: bool = False  # --train may replace adapters already in adapter_path
    test_batches: int = -1
    train_config: TrainConfig = field(default_factory=TrainConfig)


def check(opts: LoraOptions) -> None:
    """Refuse options that cannot work, before any model is loaded or file written."""
    if not (opts.train or opts.test):
        raise UserError("nothing to do: pass --train and/or --test")
    if not opts.data.is_dir():
        raise UserError(f"--data {opts.data} is not a folder (it needs train.jsonl, valid.jsonl, test.jsonl)")
    if opts.max_seq_length < 2:
        raise UserError(f"--max-seq-length must be at least 2, got {opts.max_seq_length}")
    if opts.rank <= 0:  # before alpha / rank is taken (apply_adapters checks it for every caller)
        raise UserError(f"--lora-rank must be positive, got {opts.rank}")
    if opts.alpha <= 0:
        raise UserError(f"--lora-alpha must be positive, got {opts.alpha}")
    if opts.train:
        opts.train_config.check()
    if opts.resume_adapter_file is not None and not Path(opts.resume_adapter_file).is_file():
        raise UserError(f"--resume-adapter-file {opts.resume_adapter_file} not found")
    folder = Path(opts.adapter_path)
    if opts.train and opts.resume_adapter_file is None and not opts.force and (
            (folder / A.ADAPTER_FILE).exists() or (folder / A.CONFIG_FILE).exists()):
        raise UserError(f"{folder} already holds adapters: pass --resume-adapter-file {folder / A.ADAPTER_FILE} to "
                        "continue them, --force to replace them, or another --adapter-path")



def run(model: nn.Module, tokenizer: Any, opts: LoraOptions, model_name: str,
        report: Callable[[dict[str, Any]], None] = lambda r: None,
        warn: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train and/or test adapters on ``model``; returns the reports and figures for ``--json``."""
    check(opts)
    cfg = opts.train_config
    splits = (["train", "valid"] if opts.train else []) + (["test"] if opts.test else [])
    data = {s: load_split(opts.data, s, tokenizer, opts.max_seq_length, opts.mask_prompt) for s in splits}
    for d in data.values():
        if d.truncated:
            warn(f"{d.truncated} of {len(d)} {d.name} examples are longer than --max-seq-length "
                 f"{opts.max_seq_length} and were truncated")
    pad = pad_id(tokenizer)
    out: dict[str, Any] = {"adapter_path": str(opts.adapter_path)}
    if opts.train:
        if opts.layers is not None and opts.layers <= 0:
            raise UserError(f"--lora-layers must be positive or all, got {opts.layers}")
        layers = len(model.layers) if opts.layers is None else min(opts.layers, len(model.layers))  # as mlx-lm
        keys = A.target_keys(model, opts.targets, layers)
        scale = opts.alpha / opts.rank
        mx.random.seed(cfg.seed)  # the adapters' initial A matrices, reproducible from --seed
        wrapped = A.apply_adapters(model, layers, keys, opts.rank, scale, opts.dropout, opts.dora)
        config = A.adapter_config(layers, keys, opts.rank, scale, opts.dropout, opts.dora, model=model_name,
                                  lora_alpha=opts.alpha, max_seq_length=opts.max_seq_length)
        trainer = Trainer(model, cfg)
        if opts.resume_adapter_file is not None:
            _resume(model, trainer, Path(opts.resume_adapter_file))
        trainable = sum(v.size for v in A.adapter_parameters(model).values())
        out.update(adapted_layers=wrapped, trainable_parameters=trainable,
                   train_examples=len(data["train"]), start_step=trainer.step)
        folder = Path(opts.adapter_path)

        def save() -> None:  # the adapters carry their step, checked against the state on resume
            A.save_adapters(model, folder, config, step_metadata(trainer.step))
            trainer.save(folder)

        train = batches(data["train"], cfg.batch_size, cfg.seed, pad)
        val = eval_batches(data["valid"], cfg.batch_size, None if cfg.val_batches < 0 else cfg.val_batches, pad)
        reports = trainer.run(train, val, save, report)
        out["reports"] = reports
        out["steps"] = trainer.step
    elif opts.test:
        A.load_adapters(model, opts.adapter_path)
    if opts.test:
        limit = None if opts.test_batches < 0 else opts.test_batches
        loss = evaluate(model, eval_batches(data["test"], cfg.batch_size, limit, pad))
        out.update(test_loss=loss, test_perplexity=math.exp(loss))
    return out


def _resume(model: nn.Module, trainer: Trainer, weights: Path) -> None:
    """Start from saved adapter weights (and, when saved beside them, the optimizer state and step)."""
    step = load_trainable(model, weights, f"--resume-adapter-file {weights}",
                          "these adapters (model, rank, layers or targets differ)")
    trainer.restore(weights.parent, step)
