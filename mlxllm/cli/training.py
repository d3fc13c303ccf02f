"""``mlxllm lora`` and ``mlxllm distill``: train adapters, or a student model, and evaluate them.

Also what the two share: the YAML ``--config`` merge, the loop settings built from the options, and
the progress display on stderr. The training code is imported inside the commands, so
``mlxllm --help`` does not pay for it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from typing import Any

import click

from ..errors import UserError
from .options import (adapter_path_option, compute_option, data_option, force_flag, force_option, load_for_command,
                      lora_rank_option, model_options, out_option, top_k_option, training_options, verbose_option)


def _apply_config_file(ctx: click.Context, path: str | None, params: dict[str, Any]) -> None:
    """Fill options left at their defaults from a YAML file whose keys are the option names
    (``lora_rank`` or ``lora-rank``); options given on the command line win."""
    if not path:
        return
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read --config {path}: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in params or name == "config":
            raise UserError(f"--config {path}: unknown option {key!r}")
        if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
            params[name] = value


def _train_config(p: dict[str, Any]):
    """The training loop's settings from the shared training options."""
    from ..train.loop import TrainConfig

    return TrainConfig(iters=p["iters"], batch_size=p["batch_size"], grad_accumulation=p["grad_accumulation"],
                       learning_rate=p["learning_rate"], lr_schedule=p["lr_schedule"], warmup=p["warmup"],
                       weight_decay=p["weight_decay"], max_grad_norm=p["max_grad_norm"],
                       steps_per_report=p["steps_per_report"], steps_per_eval=p["steps_per_eval"],
                       val_batches=p["val_batches"], save_every=p["save_every"], seed=p["seed"],
                       grad_checkpoint=p["grad_checkpoint"])


@contextlib.contextmanager
def _training_progress(what: str, total: int | None, quiet: bool):
    """A rich progress bar on stderr; yields ``(report, progress, console)``: ``report`` takes the loop's
    reports (loss, learning rate, tokens/s, iterations/s, peak memory; validation lines printed above
    the bar), ``progress(what, done, total)`` shows other long steps (a teacher pass)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[stats]}")]
    with Progress(*columns, console=console, disable=quiet) as bars:
        task = bars.add_task(what, total=total, stats="", start=False)
        others: dict[str, Any] = {}

        def report(r: dict[str, Any]) -> None:
            if "val_loss" in r:
                bars.console.print(f"step {r['step']}: validation loss {r['val_loss']:.3f}")
            elif "eval" in r:
                bars.console.print(f"{r['eval']}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k != "eval"))
            else:
                bars.start_task(task)
                bars.update(task, completed=r["step"], stats=(
                    f"loss {r['train_loss']:.3f} | lr {r['learning_rate']:.1e} | {r['tokens_per_s']:.0f} tok/s | "
                    f"{r['iters_per_s']:.2f} it/s | peak {r['peak_memory_gb']:.2f} GB"))

        def progress(what: str, done: int, total: int) -> None:
            if what not in others:
                others[what] = bars.add_task(what, total=total, stats="")
            bars.update(others[what], completed=done)

        yield report, progress, console


@click.command("lora")
@model_options
@data_option(required=True, type=click.Path(), help="Folder with train.jsonl, valid.jsonl, test.jsonl.")
@click.option("--train", "do_train", is_flag=True, help="Train adapters.")
@click.option("--test", "do_test", is_flag=True,
              help="Report loss and perplexity on test.jsonl (after training, or of --adapter-path).")
@adapter_path_option(default="adapters", show_default=True,
                     help="Where adapters and checkpoints are written (and read by --test alone).")
@lora_rank_option(default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="Update scale = alpha / rank.")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--lora-layers", default="16", show_default=True,
              help="Adapt the last N blocks (all when the model has fewer), or all.")
@click.option("--lora-targets", default="q,k,v,o,gate,up,down", show_default=True, help="Layers to adapt.")
@click.option("--dora", is_flag=True, help="DoRA: also learn each output row's magnitude.")
@click.option("--test-batches", type=int, default=-1, show_default=True, help="-1: the whole test split.")
@click.option("--resume-adapter-file", default=None, type=click.Path(dir_okay=False),
              help="Continue from these adapter weights (and the optimizer state saved beside them).")
@force_flag("With --train: replace adapters already in --adapter-path.")
@training_options
@click.pass_context
def lora_command(ctx, **params) -> None:
    """Fine-tune LoRA / DoRA adapters (QLoRA on a quantized base); --test evaluates them."""
    from ..train.finetune import check, run

    _apply_config_file(ctx, params["config"], params)
    p = params
    opts = _lora_options(p)
    check(opts)  # before the model loads and the progress display starts
    cfg = opts.train_config
    model, tokenizer = load_for_command(p["model_spec"], p["compute"], p["verbose"])
    with _training_progress("training" if p["do_train"] else "testing", cfg.iters if p["do_train"] else None,
                            p["as_json"]) as (report, _, console):
        result = run(model, tokenizer, opts, str(model.load_report.path), report,
                     warn=lambda s: console.print(f"warning: {s}"))
    if p["as_json"]:
        click.echo(json.dumps(result))
        return
    if p["do_train"]:
        click.echo(f"saved adapters to {opts.adapter_path} after {result['steps']} steps "
                   f"({result['trainable_parameters']:,} trainable parameters in {result['adapted_layers']} layers)")
    if p["do_test"]:
        click.echo(f"test loss {result['test_loss']:.3f}, perplexity {result['test_perplexity']:.3f}")


def _lora_options(p: dict[str, Any]):
    """``LoraOptions`` from the command's options, checked before the model is loaded."""
    from pathlib import Path

    from ..train.finetune import LoraOptions

    layers = p["lora_layers"]
    if str(layers) != "all" and not str(layers).lstrip("-").isdigit():
        raise UserError(f"--lora-layers takes a number or all, got {layers}")
    cfg = _train_config(p)
    targets = [t.strip() for t in str(p["lora_targets"]).split(",") if t.strip()]
    return LoraOptions(data=Path(p["data"]), adapter_path=Path(p["adapter_path"]), train=p["do_train"],
                       test=p["do_test"], max_seq_length=p["max_seq_length"], mask_prompt=p["mask_prompt"],
                       rank=p["lora_rank"], alpha=p["lora_alpha"], dropout=p["lora_dropout"],
                       layers=None if str(layers) == "all" else int(layers), targets=targets, dora=p["dora"],
                       resume_adapter_file=p["resume_adapter_file"], force=p["force"], test_batches=p["test_batches"],
                       train_config=cfg)


@click.command("distill")
@click.option("--teacher", required=True, help="The model to imitate (GGUF file, model folder or Hub id).")
@out_option(default=None, help="Where the student is written (a model folder; checkpoints in OUT/checkpoint). "
            "Without it, --eval only compares --student with the teacher.")
@click.option("--student", default=None, help="An existing student model (same tokenizer as the teacher).")
@click.option("--student-init", default=None,
              help="Build the student from the teacher: prune:every-2nd-layer, prune:layers=0,2,..., "
              "quantize:BITS[:GROUP] (train only the quantization scales and biases), or config:FILE (random init).")
@data_option(required=True, type=click.Path(), help="Folder with train/valid(/test).jsonl, or one jsonl file.")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Softening of both distributions.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the cross-entropy on the data; the KL term gets 1 - alpha.")
@top_k_option(default=64, show_default=True, help="Teacher tokens kept per position (sparse KL).")
@click.option("--teacher-cache", default=None, type=click.Path(file_okay=False),
              help="Folder of cached teacher outputs (default ~/.cache/mlxllm/teacher-cache).")
@click.option("--feature-loss", default=None, help="hidden:mse[:WEIGHT]: also match the final hidden states.")
@click.option("--seq-level", type=int, default=0, show_default=True,
              help="Sequence-level distillation: the teacher writes this many tokens per training prompt; "
              "the student also trains on them (0: off).")
@lora_rank_option(default=0, show_default=True,
                  help="Train rank-r LoRA adapters on the student (fused at the end) instead of all its weights.")
@click.option("--eval", "do_eval", is_flag=True,
              help="Top-1 agreement, KL and perplexity of student vs teacher on held-out data (before and after).")
@click.option("--eval-batches", type=int, default=-1, show_default=True, help="-1: the whole held-out split.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in OUT/checkpoint.")
@force_option
@compute_option(default="float32", show_default=True,
                help="Weight representation of teacher and student while training.")
@verbose_option(help="Tracebacks on errors.")
@training_options
@click.pass_context
def distill_command(ctx, **params) -> None:
    """Distil a teacher into a smaller (or quantized) student; --eval compares the two."""
    from ..formats.hub import resolve
    from ..formats.loader import load
    from ..formats.save import save_model
    from ..tools.conversion import tokenizer_files_of
    from ..train.distill import run

    _apply_config_file(ctx, params["config"], params)
    p = params
    _check_distill_choices(p)
    teacher_path = resolve(p["teacher"])
    teacher, tokenizer = load(teacher_path, compute=p["compute"])
    student, student_tokenizer = _student(p, teacher_path, teacher, tokenizer)
    out = _distill_out(p)
    opts = _distill_options(p, out)

    def save_student(model) -> None:
        with tokenizer_files_of(teacher_path) as tok_files:
            save_model(model, out, tok_files, keep=("checkpoint",))

    with _training_progress("distilling", opts.train_config.iters if out is not None else None, p["as_json"]) as (
            report, progress, console):
        result = run(teacher, tokenizer, teacher_path, student, student_tokenizer, opts, save_student, report,
                     progress, warn=lambda s: console.print(f"warning: {s}"))
    _print_distill_result(result, out, p["as_json"])


def _check_distill_choices(p: dict[str, Any]) -> None:
    """Reject contradictory or missing choices before any model is loaded."""
    if (p["student"] is None) == (p["student_init"] is None):
        raise UserError("give either --student or --student-init")
    if p["out"] is None and not p["do_eval"]:
        raise UserError("--out is needed to train (or pass --eval to only compare --student with the teacher)")
    if p["out"] is None and p["student"] is None:
        raise UserError("--eval without --out needs --student (the model to compare)")
    init = p["student_init"]
    if init is not None and not init.startswith(("prune:", "quantize:", "config:")):
        raise UserError(f"--student-init takes prune:..., quantize:BITS[:GROUP] or config:FILE, got {init}")


def _student(p: dict[str, Any], teacher_path, teacher, tokenizer):
    """The student and its tokenizer: ``--student`` loaded as given, or built from the teacher by
    ``--student-init`` (pruned layers, quantized weights, or a fresh model from a config file)."""
    from pathlib import Path

    from ..formats.loader import load, load_model
    from ..train import students

    if p["student"] is not None:
        return load(p["student"], compute=p["compute"])
    init = p["student_init"]
    kind, _, spec = init.partition(":")
    if kind == "config":
        return students.from_config(Path(spec), teacher.config), tokenizer
    student = load_model(teacher_path, compute="float32")
    if kind == "prune":
        students.prune_layers(student, students.pruned_layers(spec, len(student.layers)))
        return student, tokenizer
    bits, _, group = spec.partition(":")
    if not bits.isdigit() or (group and not group.isdigit()):
        raise UserError(f"--student-init quantize:BITS[:GROUP], got {init}")
    from ..model.quantize import check_quantization

    check_quantization(int(bits), int(group or 64), "affine")
    students.quantized_student(student, int(bits), int(group or 64))
    return student, tokenizer


def _distill_out(p: dict[str, Any]):
    """The ``--out`` folder (or None): an existing one is only reused with --resume or replaced with --force."""
    from pathlib import Path

    out = Path(p["out"]) if p["out"] else None
    if out is not None and out.exists() and not p["resume"] and any(out.iterdir()) and not p["force"]:
        raise UserError(f"{out} exists: choose another --out, pass --resume to continue it, or --force to replace it")
    if out is not None and p["force"] and not p["resume"]:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # a fresh run: the old training state goes
    return out


def _distill_options(p: dict[str, Any], out):
    """``DistillOptions`` from the command's options; without ``--out`` nothing is trained."""
    from pathlib import Path

    from ..train.distill import DistillOptions

    cfg = _train_config(p)
    return DistillOptions(data=Path(p["data"]), out=out or Path("."), temperature=p["temperature"], alpha=p["alpha"],
                          top_k=p["top_k"], teacher_cache=p["teacher_cache"], feature_loss=p["feature_loss"],
                          seq_level=p["seq_level"], lora_rank=p["lora_rank"], max_seq_length=p["max_seq_length"],
                          mask_prompt=p["mask_prompt"], resume=p["resume"], train=out is not None, eval=p["do_eval"],
                          eval_batches=p["eval_batches"], train_config=cfg)


def _print_distill_result(result: dict[str, Any], out, as_json: bool) -> None:
    """The comparisons (before, after, or the --eval-only one) and where the student went."""
    if as_json:
        click.echo(json.dumps(result))
        return
    for when in ("eval", "before", "after"):
        if when in result:
            r = result[when]
            label = "student vs teacher" if when == "eval" else when
            click.echo(f"{label}: top-1 agreement {r['top1_agreement']:.1%}, KL {r['kl']:.4f} nats, student "
                       f"perplexity {r['student_perplexity']:.3f} (teacher {r['teacher_perplexity']:.3f}) over "
                       f"{r['tokens']} tokens")
    if out is not None:
        click.echo(f"saved the student ({result['student_layers']} layers, {result['trainable_parameters']:,} trained "
                   f"parameters) to {out} after {result['steps']} steps")
