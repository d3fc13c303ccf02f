"""``mlxllm bench`` and ``mlxllm perplexity``: how fast a model runs, and how well it predicts a text.

The benchmark and scoring tools are imported inside the commands, so ``mlxllm --help`` does not pay
for them.
"""

from __future__ import annotations

import json
import sys

import click

from ..errors import UserError
from ..files import write_atomic
from .options import (adapter_option, batch_size_option, data_option, draft_options, int_list, json_option,
                      json_path_option, kv_options, load_for_command, max_tokens_option, model_options)


@click.command("bench")
@model_options
@click.option("--prompt-lengths", "-p", default="128,512,2048", show_default=True,
              help="Comma-separated prompt lengths in tokens (2k = 2048).")
@click.option("--gen-tokens", "-g", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated per trial (EOS ignored).")
@click.option("--trials", "-n", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed trials per length, after one warm-up.")
@batch_size_option("-b", type=click.IntRange(min=1), default=1, show_default=True,
                   help="Sequences decoded together (the same prompt in every row).")
@click.option("--sweep", default=None, help="Context lengths for the decode/TTFT sweep (default with --plot: "
              "1K..32K, capped by the context and memory).")
@click.option("--sweep-gen", type=click.IntRange(min=2), default=16, show_default=True)
@kv_options
@click.option("--compare", "peers", default=None, help="Peers to run side by side: mlx-lm, llama.cpp.")
@json_path_option("Write every number here.")
@draft_options("Also time speculative decoding with this draft model (acceptance rate and speedup).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the context sweep as a PNG (needs matplotlib: pip install 'mlxllm[plot]').")
def bench_command(model_spec, compute, verbose, prompt_lengths, gen_tokens, trials, batch_size, sweep, sweep_gen, kv,
                  peers, json_path, draft_model, num_draft_tokens, plot_path) -> None:
    """Time to first token, prefill and decode speed, and decode bandwidth against the device's peak."""
    from ..tools import benchmark as bm

    lengths = int_list(prompt_lengths, "--prompt-lengths")
    if not lengths:
        raise UserError("--prompt-lengths is empty")
    sweep_lengths = int_list(sweep, "--sweep")
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


def _read_text(data: str | None, default_text) -> str:
    """The text to score: stdin for ``-``, a UTF-8 file, or the built-in offline text."""
    if data == "-":
        return sys.stdin.read()
    if not data:
        return default_text()
    try:
        with open(data, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --data {data}: {e}") from None


@click.command("perplexity")
@model_options
@adapter_option
@data_option(default=None, help="Text file, or - for stdin (default: Python's pydoc topics, offline).")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--stride", type=int, default=None, help="Window step (default: --seq-len, non-overlapping).")
@max_tokens_option(type=click.IntRange(min=2), default=None, help="Score only the first N tokens.")
@batch_size_option("-b", type=click.IntRange(min=1), default=4, show_default=True)
@kv_options
@json_option("Print the result as JSON.")
def perplexity_command(model_spec, compute, verbose, adapter_path, data, seq_len, stride, max_tokens, batch_size, kv,
                       as_json) -> None:
    """Perplexity (with its standard error) of a model on a text."""
    from rich.progress import Progress

    from ..tools import perplexity as pp

    text = _read_text(data, pp.default_text)
    step = pp.check_window(seq_len, stride)
    model, tokenizer = load_for_command(model_spec, compute, verbose, adapter_path)
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
