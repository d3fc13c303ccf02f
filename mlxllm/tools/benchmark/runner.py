"""The whole ``mlxllm bench`` run: load the model (and a draft), measure the device's peaks, time every
prompt length, the context sweep, speculative decoding and the peers, behind one progress bar, and
return every number with the machine it was measured on as one plain dict (what ``--json`` writes).

The peaks are measured in the same process, on the same device and in the model's activation dtype
right before the trials, so "% of peak" compares like with like.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from mlx.utils import tree_flatten

from ... import backend
from ...model.cache import KVSettings
from .cost import activation_dtype, decode_weight_bytes, kv_bytes
from .probes import measure_peaks, published_bandwidth
from .trials import bench_length, bench_speculative, check_lengths, prompt_text, run_trial, sweep_lengths


def _load_models(model_spec: str | None, compute: str, draft_model: str | None, longest: int) -> tuple:
    """The model and tokenizer, and the draft model checked against them for ``longest`` positions."""
    from ...formats.hub import resolve
    from ...formats.loader import load

    model, tokenizer = load(resolve(model_spec), compute=compute)
    draft = None
    if draft_model is not None:
        from ...engine.speculative import check_draft
        from ...formats.loader import load_draft

        draft = load_draft(draft_model, compute, tokenizer)
        check_draft(model, draft, longest)
    return model, tokenizer, draft


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, transient=True)


def _time_sweep(model: Any, tokenizer: Any, contexts: list[int], gen: int, batch: int, kv: KVSettings,
                progress: Any, task: Any) -> list[dict[str, Any]]:
    """One trial per context length, with the decode bandwidth at the middle of its decode run."""
    step_weights = decode_weight_bytes(model, batch)
    points = []
    for c in contexts:
        progress.update(task, description=f"sweep {c}")
        t = run_trial(model, tokenizer, prompt_text(tokenizer, c), gen, batch, kv=kv)
        step_bytes = step_weights + kv_bytes(model, c + gen // 2, batch, kv=kv)
        points.append({**asdict(t), "context": t.prompt_tokens,
                       "decode_gbps": step_bytes * t.decode_tps / batch / 1e9 if t.decode_tps else None})
        progress.advance(task)
    return points


def _machine(peaks: dict[str, Any]) -> dict[str, Any]:
    published = published_bandwidth()
    return {**backend.describe(), "peaks": peaks,
            "published_gbps": {"chip": published[0], "gbps": published[1]} if published else None}


def _model_facts(model: Any, batch: int) -> dict[str, Any]:
    line = model.load_report
    return {"path": str(line.path), "format": line.format, "weights": line.target, "detail": line.detail,
            "weight_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
            "decode_weight_bytes": decode_weight_bytes(model, batch), "load_s": line.seconds,
            "activation_dtype": str(activation_dtype(model)).removeprefix("mlx.core.")}


def run_bench(model_spec: str | None, *, compute: str = "auto", lengths: list[int], gen_tokens: int = 128,
              trials: int = 5, batch: int = 1, sweep: list[int] | None = (), sweep_gen: int = 16,
              peers: Sequence[str] = (), kv: KVSettings | None = None, draft_model: str | None = None,
              num_draft_tokens: int = 3) -> dict[str, Any]:
    """Load the model, measure the device's peaks, time every prompt length, the context sweep
    (``None``: the default lengths) and the peers; return every number with the machine.
    ``kv`` says how the KV cache of the global attention layers is stored. ``draft_model`` adds
    speculative decoding's speed and acceptance next to the plain decode, alternated trial by trial."""
    from ..peers import compare

    model, tokenizer, draft = _load_models(model_spec, compute, draft_model, max(lengths) + gen_tokens)
    kv = (kv or KVSettings()).checked(model.config)
    check_lengths(model, lengths, gen_tokens, batch, kv)
    sweep = sweep_lengths(model, batch, kv=kv) if sweep is None else list(sweep)
    check_lengths(model, sweep, sweep_gen, batch, kv)
    facts, loaded = _model_facts(model, batch), model.load_report
    n_peers = len(peers) + 1 if peers else 0
    total = len(lengths) * trials * (1 + n_peers + (draft is not None)) + len(sweep) + 1
    with _progress() as progress:
        task = progress.add_task("measuring peaks", total=total)
        tick = lambda: progress.advance(task)  # noqa: E731
        peaks = measure_peaks(activation_dtype(model))
        tick()
        results = []
        for p in lengths:
            progress.update(task, description=f"prompt {p}")
            results.append(bench_length(model, tokenizer, p, gen_tokens, trials, peaks, batch, on_trial=tick, kv=kv))
        points = _time_sweep(model, tokenizer, sweep, sweep_gen, batch, kv, progress, task)
        speculative = None
        if draft is not None:
            progress.update(task, description="speculative")
            speculative = bench_speculative(model, draft, tokenizer, lengths, gen_tokens, trials, num_draft_tokens,
                                            on_trial=tick)
            del draft
        peer_report = None
        if peers:
            del model  # the peers' processes need the memory
            progress.update(task, description="peers")
            peer_report = compare(loaded.path, loaded.format, list(peers), lengths, gen_tokens, trials, compute,
                                  on_trial=tick)
    return {
        "machine": _machine(peaks),
        "model": facts,
        "settings": {"prompt_lengths": lengths, "gen_tokens": gen_tokens, "trials": trials, "batch_size": batch,
                     "sweep_gen_tokens": sweep_gen, "kv_bits": kv.bits,
                     "kv_group_size": kv.group_size if kv.quantized else None,
                     "quantized_kv_start": kv.start if kv.quantized else None},
        "results": [asdict(r) for r in results],
        "sweep": points,
        "compare": peer_report,
        "speculative": speculative and {"draft_model": str(draft_model), "rows": speculative},
    }
