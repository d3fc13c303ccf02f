"""The ``mlxllm`` command line: generate, chat, info, bench, convert, perplexity, lora, fuse, distill.

Every user mistake ends as one ``error: ...`` line on stderr and a nonzero exit; tracebacks only with
``--verbose``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
import traceback
from typing import Any

import click

from .. import backend
from ..errors import UserError
from ..files import write_atomic

COMPUTE_CHOICES = click.Choice(["auto", "float32", "native"])


def _model_options(f):
    f = click.option(
        "--compute", type=COMPUTE_CHOICES, default="auto", show_default=True,
        help="Weight representation: float32 (fastest on the CPU backend), native (the file's own, "
        "e.g. quantized), or auto (float32 on CPU when it fits, native on Metal/CUDA).",
    )(f)
    f = click.option("--model", "-m", "model_spec", default=None,
                     help="GGUF file, HF/mlx-community directory, or Hub repo id (default: bundled SmolLM2).")(f)
    return click.option("--verbose", "-v", is_flag=True, help="Timings on stderr; tracebacks on errors.")(f)


def _sampling_options(f):
    for opt in reversed([
        click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=256, show_default=True),
        click.option("--temp", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--prefill-step-size", type=click.IntRange(min=1), default=512, show_default=True),
    ]):
        f = opt(f)
    return _kv_options(f)


def _kv_options(f):
    """The three KV-cache flags, handed to the command as one ``kv`` value (``KVSettings``)."""

    @functools.wraps(f)
    def command(*args, kv_bits, kv_group_size, quantized_kv_start, **kw):
        from ..model.cache import KVSettings

        return f(*args, kv=KVSettings(kv_bits, kv_group_size, quantized_kv_start), **kw)

    for opt in reversed([
        click.option("--kv-bits", type=int, default=None, help="Quantize the KV cache to this many bits (e.g. 4, 8)."),
        click.option("--kv-group-size", type=int, default=64, show_default=True),
        click.option("--quantized-kv-start", type=int, default=0, show_default=True,
                     help="Positions kept in float before the KV cache switches to --kv-bits."),
    ]):
        command = opt(command)
    return command


def _sampling_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    from ..engine.sample import check_sampling

    check_sampling(kw["temp"], kw["top_p"], kw["top_k"], kw["min_p"], kw["repetition_penalty"])
    keys = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop", "prefill_step_size", "kv")
    return {k: kw[k] for k in keys}


def _adapter_option(f):
    return click.option("--adapter-path", default=None, type=click.Path(file_okay=False),
                        help="Apply the LoRA/DoRA adapters in this folder (mlxllm lora or mlx_lm.lora output).")(f)


def _load(model_spec: str | None, compute: str, verbose: bool, adapter_path: str | None = None):
    from ..formats.loader import load

    model, tokenizer = load(model_spec, compute=compute, adapter_path=adapter_path)
    if verbose:
        facts = backend.describe()
        path = getattr(model, "compute_path", compute)
        click.echo(f"[mlxllm] backend={facts['backend']} blas={facts['blas']} weights={path}", err=True)
    return model, tokenizer


def _build_prompt(tokenizer, prompt: str, system: str | None, chat: bool | None) -> str:
    use_chat = tokenizer.has_chat_template if chat is None else chat
    if use_chat and not tokenizer.has_chat_template:
        raise UserError("--chat: this model has no chat template")
    if not use_chat:
        if system:
            raise UserError("--system needs a chat template (use --chat with a chat model)")
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxllm")
def cli() -> None:
    """Run open LLMs with MLX: GGUF and Hugging Face models, exact tokenizers, fast generation."""


@cli.command()
@_model_options
@_adapter_option
@_sampling_options
@click.option("--prompt", "-p", default="hello", show_default=True, help="Prompt text, or - to read stdin.")
@click.option("--system", default=None, help="System message (chat models).")
@click.option("--chat/--no-chat", default=None, help="Apply the model's chat template (default: when it has one).")
@click.option("--draft-model", default=None,
              help="Speculative decoding: a small model with the same tokenizer drafts tokens the model verifies.")
@click.option("--num-draft-tokens", type=click.IntRange(min=1), default=3, show_default=True,
              help="Tokens the draft model proposes per round.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the text and the timings.")
def generate(model_spec, compute, verbose, adapter_path, prompt, system, chat, draft_model, num_draft_tokens, as_json,
             **kw) -> None:
    """Generate a completion for a prompt."""
    from ..engine.stream import format_stats, stream_generate

    sampling = _sampling_kwargs(kw)
    if prompt == "-":
        prompt = sys.stdin.read()
    model, tokenizer = _load(model_spec, compute, verbose, adapter_path)
    if draft_model is not None:
        from ..formats.loader import load_draft

        sampling.update(draft_model=load_draft(draft_model, compute, tokenizer), num_draft_tokens=num_draft_tokens)
    text = _build_prompt(tokenizer, prompt, system, chat)
    out, last = [], None
    for last in stream_generate(model, tokenizer, text, kw["max_tokens"], **sampling):
        out.append(last.text)
        if not as_json:
            click.echo(last.text, nl=False)
    if as_json:
        fields = ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory",
                  "finish_reason", "ttft") + (("draft_acceptance",) if draft_model else ())
        record = {"text": "".join(out), **({k: getattr(last, k) for k in fields} if last else {})}
        click.echo(json.dumps(record))
        return
    click.echo()
    if verbose and last is not None:
        click.echo(format_stats(last), err=True)


@cli.command()
@_model_options
@_adapter_option
@_sampling_options
@click.option("--system", default=None, help="System message.")
def chat(model_spec, compute, verbose, adapter_path, system, **kw) -> None:
    """Multi-turn chat. /reset clears the history, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply.
    The KV cache is kept between turns, so a turn computes only the new messages."""
    from ..engine.prompt_cache import PromptCache
    from ..engine.stream import encode_prompt, format_stats, stream_generate

    sampling = _sampling_kwargs(kw)
    model, tokenizer = _load(model_spec, compute, verbose, adapter_path)
    if not tokenizer.has_chat_template:
        raise UserError("this model has no chat template; use `mlxllm generate` instead")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    kv = sampling.pop("kv")  # the kept cache carries the KV settings
    kept = PromptCache(model, kv)
    click.echo("Chat: /reset clears the history, /exit leaves. Ctrl-C stops a reply.", err=True)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = list(start)
            kept = PromptCache(model, kv)
            click.echo("(history cleared)", err=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = encode_prompt(tokenizer, tokenizer.apply_chat_template(history, add_generation_prompt=True)).tolist()
        todo = kept.suffix(ids)  # only what the cache does not hold yet goes through the model
        reply, last, generated = "", None, []
        try:
            for last in stream_generate(model, tokenizer, todo, kw["max_tokens"], prompt_cache=kept.cache,
                                        **sampling):
                generated.append(last.token)
                reply += last.text
                click.echo(last.text, nl=False)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        kept.record(ids + generated)
        click.echo()
        history.append({"role": "assistant", "content": reply})
        if verbose and last is not None:
            click.echo(format_stats(last), err=True)


@cli.command()
@click.argument("model_spec", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verbose", "-v", is_flag=True)
def info(model_spec, as_json, verbose) -> None:
    """Architecture, parameter count, quantization, context length and memory needed."""
    from ..formats.loader import describe_model
    from ..formats.hub import resolve

    facts = describe_model(resolve(model_spec))
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        click.echo(f"{key:<{width}}  {value}")


def _int_list(value: str | None, option: str) -> list[int]:
    """Parse "128,512,2k" (k = 1024); anything else is one clear error."""
    out = []
    for item in (value or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            out.append(int(item.removesuffix("k")) * (1024 if item.endswith("k") else 1))
        except ValueError:
            raise UserError(f"{option} takes comma-separated integers (e.g. 128,512,2k), got '{value}'") from None
    return out


@cli.command()
@_model_options
@click.option("--prompt-lengths", "-p", default="128,512,2048", show_default=True,
              help="Comma-separated prompt lengths in tokens (2k = 2048).")
@click.option("--gen-tokens", "-g", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated per trial (EOS ignored).")
@click.option("--trials", "-n", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed trials per length, after one warm-up.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences decoded together (the same prompt in every row).")
@click.option("--sweep", default=None, help="Context lengths for the decode/TTFT sweep (default with --plot: "
              "1K..32K, capped by the context and memory).")
@click.option("--sweep-gen", type=click.IntRange(min=2), default=16, show_default=True)
@_kv_options
@click.option("--compare", "peers", default=None, help="Peers to run side by side: mlx-lm, llama.cpp.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write every number here.")
@click.option("--draft-model", default=None,
              help="Also time speculative decoding with this draft model (acceptance rate and speedup).")
@click.option("--num-draft-tokens", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the context sweep as a PNG (needs matplotlib: pip install 'mlxllm[plot]').")
def bench(model_spec, compute, verbose, prompt_lengths, gen_tokens, trials, batch_size, sweep, sweep_gen, kv, peers,
          json_path, draft_model, num_draft_tokens, plot_path) -> None:
    """Time to first token, prefill and decode speed, and decode bandwidth against the device's peak."""
    from ..tools import benchmark as bm

    lengths = _int_list(prompt_lengths, "--prompt-lengths")
    if not lengths:
        raise UserError("--prompt-lengths is empty")
    sweep_lengths = _int_list(sweep, "--sweep")
    peer_list = [p.strip() for p in (peers or "").split(",") if p.strip()]
    from ..tools.peers import check_peers

    check_peers(peer_list)
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'mlxllm[plot]'") from None
    report = bm.run_bench(
        model_spec, compute=compute, lengths=lengths, gen_tokens=gen_tokens, trials=trials, batch=batch_size,
        sweep=sweep_lengths or (None if plot_path else []), sweep_gen=sweep_gen, peers=peer_list,
        kv=kv, draft_model=draft_model, num_draft_tokens=num_draft_tokens,
    )
    bm.print_report(report)
    if json_path:
        write_atomic(json_path, json.dumps(report, indent=2, default=str))
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        bm.plot_sweep(report, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


@cli.command()
@click.option("--model", "-m", "model_spec", required=True, help="HF / mlx-community directory or Hub repo id.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--quantize", "-q", is_flag=True, help="Quantize the linear maps, embeddings and experts.")
@click.option("--q-bits", type=int, default=4, show_default=True)
@click.option("--q-group-size", type=int, default=64, show_default=True)
@click.option("--q-mode", default="affine", show_default=True)
@click.option("--recipe", default=None, help="Mixed precision, e.g. mixed_3_6 (3 bits, 6 for the sensitive layers).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast unquantized weights (default: keep the source's).")
@click.option("--requantize", type=click.Choice(["q8", "q4", "float"]), default="q8", show_default=True,
              help="GGUF block types MLX lacks (K-quants, Q5_x, IQ*): MLX 8-bit, 4-bit, or 16-bit float.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.option("--verbose", "-v", is_flag=True)
def convert(model_spec, out, quantize, q_bits, q_group_size, q_mode, recipe, dtype, requantize, force, as_json,
            verbose) -> None:
    """Write a model in the mlx-community layout (loads in mlxllm and mlx-lm), optionally quantized."""
    from rich.console import Console

    from ..tools.conversion import convert as run

    with Console(stderr=True).status(f"converting {model_spec} ..."):
        report = run(model_spec, out, quantize=quantize, bits=q_bits, group_size=q_group_size, mode=q_mode,
                     dtype=dtype, recipe=recipe, requantize=requantize, force=force)
    if as_json:
        click.echo(json.dumps(report))
        return
    for row in report.get("gguf_tensors", []):
        error = f", +{100 * row['added_rms_error']:.2f} % RMS error" if "added_rms_error" in row else ""
        click.echo(f"  {row['type']:>6}: {row['tensors']:4d} tensors, {row['action']}{error}")
    click.echo(f"wrote {report['out']}: {report['weights']}, {report['bytes'] / 2**20:.0f} MiB "
               f"({report['bits_per_weight']:.2f} bits per weight)")


@cli.command()
@_model_options
@_adapter_option
@click.option("--data", default=None, help="Text file, or - for stdin (default: Python's pydoc topics, offline).")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--stride", type=int, default=None, help="Window step (default: --seq-len, non-overlapping).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score only the first N tokens.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=4, show_default=True)
@_kv_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def perplexity(model_spec, compute, verbose, adapter_path, data, seq_len, stride, max_tokens, batch_size, kv,
               as_json) -> None:
    """Perplexity (with its standard error) of a model on a text."""
    from rich.progress import Progress

    from ..tools import perplexity as pp

    if data == "-":
        text = sys.stdin.read()
    elif data:
        try:
            with open(data, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --data {data}: {e}") from None
    else:
        text = pp.default_text()
    step = pp.check_window(seq_len, stride)
    model, tokenizer = _load(model_spec, compute, verbose, adapter_path)
    kv = kv.checked(model.config)
    tokens = tokenizer.encode(text)[:max_tokens]
    with Progress(transient=True, disable=as_json) as progress:
        task = progress.add_task("scoring", total=len(pp.windows(len(tokens), seq_len, step)) or None)
        nll = pp.token_nll(model, tokens, seq_len, stride, batch_size, on_window=lambda: progress.advance(task), kv=kv)
    result = {**pp.summarize(nll), "seq_len": seq_len, "stride": step, "kv_bits": kv.bits,
              "kv_group_size": kv.group_size if kv.quantized else None,
              "model": str(model.load_report.path), "weights": model.load_report.target}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"perplexity {result['perplexity']:.3f} ± {result['perplexity_stderr']:.3f} over "
               f"{result['tokens']} tokens (windows of {seq_len}, stride {result['stride']})")


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


def _training_options(f):
    """The options every training command shares (the loop's settings, data shaping, output)."""
    for opt in reversed([
        click.option("--iters", type=int, default=1000, show_default=True),
        click.option("--batch-size", type=int, default=4, show_default=True),
        click.option("--grad-accumulation", type=int, default=1, show_default=True, help="Micro-batches per optimizer step."),
        click.option("--max-seq-length", type=int, default=2048, show_default=True),
        click.option("--learning-rate", type=float, default=1e-4, show_default=True),
        click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True),
        click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up steps."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off)."),
        click.option("--mask-prompt/--no-mask-prompt", default=None,
                  help="Score only completions / assistant turns (default: on for chat data, off otherwise)."),
        click.option("--grad-checkpoint", is_flag=True, help="Recompute activations in the backward pass (less memory)."),
        click.option("--save-every", type=int, default=100, show_default=True),
        click.option("--steps-per-report", type=int, default=10, show_default=True),
        click.option("--steps-per-eval", type=int, default=200, show_default=True),
        click.option("--val-batches", type=int, default=25, show_default=True, help="-1: the whole validation split."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--config", default=None, type=click.Path(dir_okay=False), help="YAML file of option values."),
        click.option("--json", "as_json", is_flag=True, help="Print the reports and results as JSON."),
    ]):
        f = opt(f)
    return f


def _train_config(p: dict[str, Any]):
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


@cli.command()
@_model_options
@click.option("--data", required=True, type=click.Path(), help="Folder with train.jsonl, valid.jsonl, test.jsonl.")
@click.option("--train", "do_train", is_flag=True, help="Train adapters.")
@click.option("--test", "do_test", is_flag=True,
              help="Report loss and perplexity on test.jsonl (after training, or of --adapter-path).")
@click.option("--adapter-path", default="adapters", show_default=True, type=click.Path(file_okay=False),
              help="Where adapters and checkpoints are written (and read by --test alone).")
@click.option("--lora-rank", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="Update scale = alpha / rank.")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--lora-layers", default="16", show_default=True,
              help="Adapt the last N blocks (all when the model has fewer), or all.")
@click.option("--lora-targets", default="q,k,v,o,gate,up,down", show_default=True, help="Layers to adapt.")
@click.option("--dora", is_flag=True, help="DoRA: also learn each output row's magnitude.")
@click.option("--test-batches", type=int, default=-1, show_default=True, help="-1: the whole test split.")
@click.option("--resume-adapter-file", default=None, type=click.Path(dir_okay=False),
              help="Continue from these adapter weights (and the optimizer state saved beside them).")
@_training_options
@click.pass_context
def lora(ctx, **params) -> None:
    """Fine-tune LoRA / DoRA adapters (QLoRA on a quantized base); --test evaluates them."""
    from pathlib import Path

    from ..train.finetune import LoraOptions, run

    _apply_config_file(ctx, params["config"], params)
    p = params
    layers = p["lora_layers"]
    if str(layers) != "all" and not str(layers).lstrip("-").isdigit():
        raise UserError(f"--lora-layers takes a number or all, got {layers}")
    cfg = _train_config(p)
    targets = [t.strip() for t in str(p["lora_targets"]).split(",") if t.strip()]
    opts = LoraOptions(data=Path(p["data"]), adapter_path=Path(p["adapter_path"]), train=p["do_train"],
                       test=p["do_test"], max_seq_length=p["max_seq_length"], mask_prompt=p["mask_prompt"],
                       rank=p["lora_rank"], alpha=p["lora_alpha"], dropout=p["lora_dropout"],
                       layers=None if str(layers) == "all" else int(layers), targets=targets, dora=p["dora"],
                       resume_adapter_file=p["resume_adapter_file"], test_batches=p["test_batches"], train_config=cfg)
    model, tokenizer = _load(p["model_spec"], p["compute"], p["verbose"])
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


@cli.command()
@click.option("--teacher", required=True, help="The model to imitate (GGUF file, model folder or Hub id).")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Where the student is written (a model folder; checkpoints in OUT/checkpoint). Without it, "
              "--eval only compares --student with the teacher.")
@click.option("--student", default=None, help="An existing student model (same tokenizer as the teacher).")
@click.option("--student-init", default=None,
              help="Build the student from the teacher: prune:every-2nd-layer, prune:layers=0,2,..., "
              "quantize:BITS[:GROUP] (train only the quantization scales and biases), or config:FILE (random init).")
@click.option("--data", required=True, type=click.Path(), help="Folder with train/valid(/test).jsonl, or one jsonl file.")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Softening of both distributions.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the cross-entropy on the data; the KL term gets 1 - alpha.")
@click.option("--top-k", type=int, default=64, show_default=True, help="Teacher tokens kept per position (sparse KL).")
@click.option("--teacher-cache", default=None, type=click.Path(file_okay=False),
              help="Folder of cached teacher outputs (default ~/.cache/mlxllm/teacher-cache).")
@click.option("--feature-loss", default=None, help="hidden:mse[:WEIGHT]: also match the final hidden states.")
@click.option("--seq-level", type=int, default=0, show_default=True,
              help="Sequence-level distillation: the teacher writes this many tokens per training prompt; "
              "the student also trains on them (0: off).")
@click.option("--lora-rank", type=int, default=0, show_default=True,
              help="Train rank-r LoRA adapters on the student (fused at the end) instead of all its weights.")
@click.option("--eval", "do_eval", is_flag=True,
              help="Top-1 agreement, KL and perplexity of student vs teacher on held-out data (before and after).")
@click.option("--eval-batches", type=int, default=-1, show_default=True, help="-1: the whole held-out split.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in OUT/checkpoint.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--compute", type=COMPUTE_CHOICES, default="float32", show_default=True,
              help="Weight representation of teacher and student while training.")
@click.option("--verbose", "-v", is_flag=True, help="Tracebacks on errors.")
@_training_options
@click.pass_context
def distill(ctx, **params) -> None:
    """Distil a teacher into a smaller (or quantized) student; --eval compares the two."""
    from pathlib import Path

    from ..formats.save import save_model
    from ..tools.conversion import tokenizer_files_of
    from ..formats.loader import load, load_model
    from ..formats.hub import resolve
    from ..train import students
    from ..train.distill import DistillOptions, run

    _apply_config_file(ctx, params["config"], params)
    p = params
    if (p["student"] is None) == (p["student_init"] is None):
        raise UserError("give either --student or --student-init")
    if p["out"] is None and not p["do_eval"]:
        raise UserError("--out is needed to train (or pass --eval to only compare --student with the teacher)")
    if p["out"] is None and p["student"] is None:
        raise UserError("--eval without --out needs --student (the model to compare)")
    init = p["student_init"]
    if init is not None and not init.startswith(("prune:", "quantize:", "config:")):
        raise UserError(f"--student-init takes prune:..., quantize:BITS[:GROUP] or config:FILE, got {init}")
    teacher_path = resolve(p["teacher"])
    teacher, tokenizer = load(teacher_path, compute=p["compute"])
    if p["student"] is not None:
        student, student_tokenizer = load(p["student"], compute=p["compute"])
    else:
        student_tokenizer = tokenizer
        kind, _, spec = init.partition(":")
        if kind == "config":
            student = students.from_config(Path(spec), teacher.config)
        else:
            student = load_model(teacher_path, compute="float32")
            if kind == "prune":
                students.prune_layers(student, students.pruned_layers(spec, len(student.layers)))
            else:
                bits, _, group = spec.partition(":")
                if not bits.isdigit() or (group and not group.isdigit()):
                    raise UserError(f"--student-init quantize:BITS[:GROUP], got {init}")
                from ..model.quantize import check_quantization

                check_quantization(int(bits), int(group or 64), "affine")
                students.quantized_student(student, int(bits), int(group or 64))
    out = Path(p["out"]) if p["out"] else None
    if out is not None and out.exists() and not p["resume"] and any(out.iterdir()) and not p["force"]:
        raise UserError(f"{out} exists: choose another --out, pass --resume to continue it, or --force to replace it")
    if out is not None and p["force"] and not p["resume"]:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # a fresh run: the old training state goes
    cfg = _train_config(p)
    opts = DistillOptions(data=Path(p["data"]), out=out or Path("."), temperature=p["temperature"], alpha=p["alpha"],
                          top_k=p["top_k"], teacher_cache=p["teacher_cache"], feature_loss=p["feature_loss"],
                          seq_level=p["seq_level"], lora_rank=p["lora_rank"], max_seq_length=p["max_seq_length"],
                          mask_prompt=p["mask_prompt"], resume=p["resume"], train=out is not None, eval=p["do_eval"],
                          eval_batches=p["eval_batches"], train_config=cfg)

    def save_student(model) -> None:
        with tokenizer_files_of(teacher_path) as tok_files:
            save_model(model, out, tok_files, keep=("checkpoint",))

    with _training_progress("distilling", cfg.iters if out is not None else None, p["as_json"]) as (
            report, progress, console):
        result = run(teacher, tokenizer, teacher_path, student, student_tokenizer, opts, save_student, report,
                     progress, warn=lambda s: console.print(f"warning: {s}"))
    if p["as_json"]:
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


@cli.command()
@click.option("--model", "-m", "model_spec", required=True, help="The base model the adapters were trained on.")
@click.option("--adapter-path", required=True, type=click.Path(file_okay=False), help="Adapter folder.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--dequantize", is_flag=True, help="Write float weights even where the base was quantized.")
@click.option("--q-bits", type=int, default=None, help="Quantize the fused model to this many bits.")
@click.option("--q-group-size", type=int, default=64, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.option("--verbose", "-v", is_flag=True)
def fuse(model_spec, adapter_path, out, dequantize, q_bits, q_group_size, force, as_json, verbose) -> None:
    """Merge adapters into the base weights: a standalone model in the mlx-community layout."""
    from rich.console import Console

    from ..tools.conversion import convert as run

    with Console(stderr=True).status(f"fusing {adapter_path} into {model_spec} ..."):
        report = run(model_spec, out, quantize=q_bits is not None, bits=q_bits or 4, group_size=q_group_size,
                     force=force, adapter_path=adapter_path, dequantize=dequantize)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"wrote {report['out']}: {report['weights']}, {report['bytes'] / 2**20:.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every failure into one line unless --verbose."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in args or "-v" in args
    try:
        code = cli.main(args=args, prog_name="mlxllm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug or an unexpected environment problem: still one line by default
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

