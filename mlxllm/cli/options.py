"""The options more than one command accepts, each declared once, and the helpers they share.

Where two commands agree on an option it is one decorator here (``model_options``, ``kv_options``,
``training_options``, ``force_option`` ...). Where they share a flag but differ in its default or help
(``--model`` is required by ``convert`` but optional for ``generate``), the flag's names and type are
fixed in one small factory here and each command passes only what differs, so a flag is never spelt
out twice. Everything heavy is imported inside the helpers that use it, so ``mlxllm --help`` stays quick.
"""

from __future__ import annotations

import functools
from typing import Any

import click

from .. import backend
from ..errors import UserError

COMPUTE_CHOICES = click.Choice(["auto", "float32", "native"])

# Flags that several commands accept with different defaults or help: the names and type live here.


def model_option(**attrs):
    """``--model/-m``, handed to the command as ``model_spec``."""
    return click.option("--model", "-m", "model_spec", **attrs)


def compute_option(**attrs):
    """``--compute``: which weight representation the loaded model computes with."""
    return click.option("--compute", type=COMPUTE_CHOICES, **attrs)


def verbose_option(**attrs):
    """``--verbose/-v``; ``main`` also reads it from the raw arguments to decide on tracebacks."""
    return click.option("--verbose", "-v", is_flag=True, **attrs)


def adapter_path_option(**attrs):
    """``--adapter-path``: a folder of LoRA/DoRA adapters (read or written, depending on the command)."""
    return click.option("--adapter-path", type=click.Path(file_okay=False), **attrs)


def out_option(**attrs):
    """``--out/-o``: the folder a command writes."""
    return click.option("--out", "-o", type=click.Path(file_okay=False), **attrs)


def json_option(help: str):
    """``--json`` as a flag: print the command's result as JSON instead of text."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def json_path_option(help: str):
    """``--json PATH``: write the command's numbers to this file (``bench``)."""
    return click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help=help)


def data_option(**attrs):
    """``--data``: the text or dataset a command reads."""
    return click.option("--data", **attrs)


def system_option(help: str):
    """``--system``: a system message for chat models."""
    return click.option("--system", default=None, help=help)


def max_tokens_option(*short: str, **attrs):
    """``--max-tokens``: how many tokens to generate, or to score."""
    return click.option("--max-tokens", *short, **attrs)


def batch_size_option(*short: str, **attrs):
    """``--batch-size``: sequences processed together."""
    return click.option("--batch-size", *short, **attrs)


def seed_option(**attrs):
    """``--seed``: the random seed (sampling, or training)."""
    return click.option("--seed", type=int, **attrs)


def top_k_option(**attrs):
    """``--top-k``: tokens kept per position (sampling, or the teacher's sparse distribution)."""
    return click.option("--top-k", type=int, **attrs)


def lora_rank_option(**attrs):
    """``--lora-rank``: the rank of trained LoRA adapters."""
    return click.option("--lora-rank", type=int, **attrs)


def q_bits_option(**attrs):
    """``--q-bits``: bits per quantized weight."""
    return click.option("--q-bits", type=int, **attrs)


def draft_options(model_help: str, tokens_help: str | None = None):
    """``--draft-model`` and ``--num-draft-tokens``: speculative decoding (``generate``) or its timing
    (``bench``); the two commands describe them differently."""

    def decorate(f):
        f = click.option("--num-draft-tokens", type=click.IntRange(min=1), default=3, show_default=True,
                         help=tokens_help)(f)
        return click.option("--draft-model", default=None, help=model_help)(f)

    return decorate


# Options the commands that accept them agree on completely.

def force_flag(help: str):
    """``--force``: replace what a command would otherwise refuse to overwrite."""
    return click.option("--force", is_flag=True, help=help)


force_option = force_flag("Replace --out if it exists.")
out_dir_option = out_option(required=True, help="Output directory.")
q_group_size_option = click.option("--q-group-size", type=int, default=64, show_default=True)
adapter_option = adapter_path_option(
    default=None, help="Apply the LoRA/DoRA adapters in this folder (mlxllm lora or mlx_lm.lora output).")


def model_options(f):
    """``--model``, ``--compute`` and ``--verbose`` for the commands that load one model and run it."""
    f = compute_option(
        default="auto", show_default=True,
        help="Weight representation: float32 (fastest on the CPU backend), native (the file's own, "
        "e.g. quantized), or auto (float32 on CPU when it fits, native on Metal/CUDA).",
    )(f)
    f = model_option(default=None,
                     help="GGUF file, HF/mlx-community directory, or Hub repo id (default: bundled SmolLM2).")(f)
    f = click.option("--pipeline", is_flag=True, expose_value=False,
                     callback=lambda ctx, _, value: ctx.meta.__setitem__("mlxllm.pipeline", value),
                     help="Under mlx.launch: split the model into runs of layers per rank (default: tensor "
                     "parallel, heads and hidden columns per rank).")(f)
    return verbose_option(help="Timings on stderr; tracebacks on errors.")(f)


def sampling_options(f):
    """How ``generate`` and ``chat`` pick tokens, plus the KV-cache options (see ``sampling_kwargs``)."""
    for opt in reversed([
        max_tokens_option("-n", type=click.IntRange(min=0), default=256, show_default=True),
        click.option("--temp", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        top_k_option(default=0, show_default=True, help="0 = off."),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=None),
        seed_option(default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--prefill-step-size", type=click.IntRange(min=1), default=512, show_default=True),
    ]):
        f = opt(f)
    return kv_options(f)


def kv_options(f):
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


def grammar_options(f):
    """``--json-schema FILE``, ``--regex R`` and ``--grammar FILE`` (Lark or GBNF), at most one, handed
    to the command as one ``grammar`` value (a ``Grammar`` or None), compiled before the model loads."""

    @functools.wraps(f)
    def command(*args, json_schema, regex, grammar_file, **kw):
        from ..engine.grammar import Grammar

        given = [g for g in (json_schema, regex, grammar_file) if g is not None]
        if len(given) > 1:
            raise UserError("give at most one of --json-schema, --regex and --grammar")
        grammar = None
        if json_schema is not None:
            grammar = Grammar.json_schema(_read_text(json_schema, "--json-schema"))
        elif regex is not None:
            grammar = Grammar.regex(regex)
        elif grammar_file is not None:
            grammar = Grammar.cfg(_read_text(grammar_file, "--grammar"))
        if grammar is not None:
            grammar.definition()
        return f(*args, grammar=grammar, **kw)

    for opt in reversed([
        click.option("--json-schema", default=None, metavar="FILE", help="Constrain the output to JSON valid under this schema."),
        click.option("--regex", default=None, metavar="R", help="Constrain the output to match this regular expression."),
        click.option("--grammar", "grammar_file", default=None, metavar="FILE",
                     help="Constrain the output to this grammar (Lark syntax or llama.cpp's GBNF)."),
    ]):
        command = opt(command)
    return command


def _read_text(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def sampling_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """The ``stream_generate`` keywords from the sampling options, checked first so a bad value fails
    before the model is loaded."""
    from ..engine.sample import check_sampling

    check_sampling(kw["temp"], kw["top_p"], kw["top_k"], kw["min_p"], kw["repetition_penalty"], seed=kw["seed"],
                   stop=kw["stop"])
    keys = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop", "prefill_step_size", "kv")
    return {k: kw[k] for k in keys}


def training_options(f):
    """The options every training command shares (the loop's settings, data shaping, output)."""
    for opt in reversed([
        click.option("--iters", type=int, default=1000, show_default=True),
        batch_size_option(type=int, default=4, show_default=True),
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
        seed_option(default=0, show_default=True),
        click.option("--config", default=None, type=click.Path(dir_okay=False), help="YAML file of option values."),
        json_option("Print the reports and results as JSON."),
    ]):
        f = opt(f)
    return f


def int_list(value: str | None, option: str) -> list[int]:
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


def load_for_command(model_spec: str | None, compute: str, verbose: bool, adapter_path: str | None = None):
    """Load a model and its tokenizer; with ``--verbose`` say which backend and weights it runs on."""
    from ..formats.loader import load

    ctx = click.get_current_context(silent=True)
    parallel = "pipeline" if ctx is not None and ctx.meta.get("mlxllm.pipeline") else "tensor"
    model, tokenizer = load(model_spec, compute=compute, adapter_path=adapter_path, parallel=parallel)
    if verbose:
        facts = backend.describe()
        path = getattr(model, "compute_path", compute)
        click.echo(f"[mlxllm] backend={facts['backend']} blas={facts['blas']} weights={path}", err=True)
    return model, tokenizer
