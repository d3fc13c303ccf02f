"""What ``mlxllm bench`` measures: time to first token, prefill and decode speed, and how close they
come to what the device can do.

Decode streams every weight it touches once per step plus the KV cache held so far, so its ceiling
is memory bandwidth; prefill is matmul-bound. The bytes and FLOPs here are counted from the loaded
model's own arrays (whatever representation loading chose), and the peaks are measured on the spot
with MLX on the same device, so "% of peak" compares like with like.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import backend
from ..model.cache import KVSettings
from ..errors import UserError
from ..files import write_atomic
from ..engine.steps import generate_tokens, wired_limit

# Apple's published unified-memory bandwidth (GB/s) by chip name; "Max" parts list the larger
# configuration. Shown next to the measured figure, never used as the denominator.
PUBLISHED_GBPS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
}


# --- bytes and FLOPs from the model's arrays ------------------------------------------------------


def _own_arrays(module: nn.Module) -> list[mx.array]:
    return [v for v in module.values() if isinstance(v, mx.array)]


def _expert_fraction(module: nn.Module, batch: int) -> float:
    """Share of an expert stack one decode step reads: the expected number of distinct experts that
    ``batch`` tokens each routing to ``top_k`` of ``num_experts`` touch, over the stack size."""
    n, k = module.num_experts, module.top_k
    return 1.0 - (1.0 - k / n) ** batch


def decode_weight_bytes(model: nn.Module, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every array once, except that an embedding lookup
    reads only ``batch`` rows (the tied head still reads the whole table) and an expert stack
    (a module with ``num_experts``/``top_k``) only its active experts."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    total = 0.0
    for _, module in model.named_modules():
        arrays = _own_arrays(module)
        size = sum(a.nbytes for a in arrays)
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            rows = arrays[0].shape[0]
            total += size if tied else size * min(batch, rows) / rows
        elif hasattr(module, "num_experts") and hasattr(module, "top_k"):
            total += size * _expert_fraction(module, batch)
        else:
            total += size
    return round(total)


def kv_bytes(model: nn.Module, context: int, batch: int = 1, dtype: mx.Dtype | None = None,
             kv: KVSettings | None = None) -> int:
    """Bytes of K and V a decode step at ``context`` positions reads (sliding layers hold their window
    in ``dtype``, default the model's activation dtype; with a quantized ``kv`` the global layers hold
    packed values plus a scale and bias per group, past the float prefix; everything is float until
    ``kv.start`` is crossed)."""
    kv = kv or KVSettings()
    cfg = model.config
    dtype = dtype or activation_dtype(model)
    heads, width = cfg.kv_cache_width
    numbers = heads * width  # per token and layer
    per_token = numbers * dtype.size
    quantized = numbers * kv.bits // 8 + 2 * (numbers // kv.group_size) * dtype.size if kv.quantized else per_token
    total = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_sliding(i):
            total += min(context, cfg.sliding_window) * per_token
        else:
            held_float = (context if context <= kv.start else min(context, kv.float_prefix)) if kv.quantized else 0
            total += held_float * per_token + (context - held_float) * quantized
    return batch * total


def _macs_per_token(module: nn.Module) -> int:
    """Multiply-accumulates per token of a (quantized) linear map or expert stack, from its weight's
    shape ``[..., out, in]`` (packed columns for quantized weights; ``top_k`` experts for a stack)."""
    out, cols = module["weight"].shape[-2:]
    macs = out * (cols * 32 // module.bits if "scales" in module else cols)
    return macs * module.top_k if hasattr(module, "num_experts") else macs


def _is_matmul(module: nn.Module) -> bool:
    return ("weight" in module and module["weight"].ndim >= 2
            and not isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)))


def prefill_flops(model: nn.Module, tokens: int) -> float:
    """FLOPs a prefill of ``tokens`` computes: the layers' matmuls for every token, attention scores
    and mixing over the keys each token sees, and the head for the last token only (as generation does)."""
    cfg = model.config
    layer_macs = sum(_macs_per_token(m) for layer in model.layers for _, m in layer.named_modules() if _is_matmul(m))
    head = model.model.embed_tokens if cfg.tie_word_embeddings else model.lm_head
    head_macs = _macs_per_token(head)
    # QK^T and PV per head and visible key (latent attention expands to its own key and value widths)
    per_key = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim if cfg.kv_lora_rank else 2 * cfg.head_dim
    attn_macs = 0
    for i in range(cfg.num_hidden_layers):
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        attn_macs += cfg.num_attention_heads * per_key * _keys_seen(tokens, window)
    return 2.0 * (layer_macs * tokens + head_macs + attn_macs)


def _keys_seen(tokens: int, window: int | None) -> int:
    """Sum over query positions 1..tokens of the keys each one attends to."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


# --- device peaks ---------------------------------------------------------------------------------


def _best_time(fn: Callable[[], Any], budget_s: float = 0.5, at_least: int = 3) -> float:
    mx.eval(fn())  # warm-up
    best, spent, runs = math.inf, 0.0, 0
    while runs < at_least or spent < budget_s:
        t = time.perf_counter()
        mx.eval(fn())
        dt = time.perf_counter() - t
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best


def _bandwidths(dtype: mx.Dtype, mbytes: int) -> dict[str, float]:
    cols = 4096
    a = mx.random.uniform(shape=(mbytes * 2**20 // dtype.size // cols, cols)).astype(dtype)
    v = mx.ones((cols, 1), dtype)
    mx.eval(a, v)
    gb = a.nbytes / 1e9
    return {
        "reduction": gb / _best_time(lambda: mx.sum(a)),
        "matrix-vector": gb / _best_time(lambda: a @ v),
        "copy": 2 * gb / _best_time(lambda: a + 1),  # read + write
    }


def _matmul_gflops(dtype: mx.Dtype, size: int = 2048) -> float:
    x, y = (mx.random.uniform(shape=(size, size)).astype(dtype) for _ in range(2))
    mx.eval(x, y)
    return 2 * size**3 / _best_time(lambda: x @ y, budget_s=0.3, at_least=2) / 1e9


def measure_peaks(dtype: mx.Dtype = mx.float32, mbytes: int = 512) -> dict[str, Any]:
    """Memory bandwidth and matmul throughput MLX reaches on this device right now.

    read: the faster of a full reduction and a matrix-vector product over ``mbytes`` of ``dtype``
    (decode is a chain of matrix-vector products; on the CPU backend the reduction is one thread);
    copy: ``y = x + 1`` counted as read + write. matmul: 2048^2 x 2048 in ``dtype``.
    """
    bw = _bandwidths(dtype, mbytes)
    read = {k: bw[k] for k in ("reduction", "matrix-vector")}
    method = max(read, key=read.get)
    return {
        "read_gbps": read[method],
        "read_method": method,
        "read_gbps_by_method": read,
        "copy_gbps": bw["copy"],
        "matmul_gflops": _matmul_gflops(dtype),
        "dtype": str(dtype).removeprefix("mlx.core."),
        "buffer_mb": mbytes,
    }


def published_bandwidth() -> tuple[str, float] | None:
    """Apple's published bandwidth for the chip MLX runs on (Metal only)."""
    if backend.device_name() != "metal":
        return None
    name = str(mx.metal.device_info().get("device_name", ""))
    chip = name.removeprefix("Apple ").strip()
    return (name, PUBLISHED_GBPS[chip]) if chip in PUBLISHED_GBPS else None


# --- trials ---------------------------------------------------------------------------------------


@dataclass
class Trial:
    prompt_tokens: int
    generated_tokens: int
    tokenize_s: float
    ttft_s: float
    prefill_tps: float
    decode_tps: float | None
    peak_memory_gb: float


def prompt_text(tokenizer: Any, tokens: int) -> str:
    """Natural text that tokenizes to about ``tokens`` ids (so timing the tokenizer is realistic)."""
    base = ("The history of computing is a story of memory: every generation of machines found that "
            "moving data cost more than computing on it, and every clever design since has tried to "
            "keep the arithmetic units fed. Caches, prefetchers, wide buses and unified memory are all "
            "answers to the same question. ")
    per_copy = len(tokenizer.encode(base, add_special_tokens=False))
    copies = tokens // max(per_copy, 1) + 2
    ids = tokenizer.encode(base * copies, add_special_tokens=False)
    while len(ids) < tokens:  # a tokenizer that merges across copies: add text until long enough
        copies *= 2
        ids = tokenizer.encode(base * copies, add_special_tokens=False)
    return tokenizer.decode(ids[:tokens])


def run_trial(model: Any, tokenizer: Any, text: str, gen_tokens: int, batch: int = 1,
              prefill_step_size: int = 512, kv: KVSettings | None = None) -> Trial:
    """One greedy generation of exactly ``gen_tokens`` steps (EOS ignored, as llama-bench does),
    timed from the call, tokenization included, to the last token."""
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    tokenized = time.perf_counter()
    prompt = mx.array([ids] * batch, dtype=mx.int32)
    stamps = []
    with wired_limit(model):
        cache = model.make_cache(kv)
        for tokens, _ in generate_tokens(prompt, model, max_tokens=gen_tokens, prefill_step_size=prefill_step_size,
                                         prompt_cache=cache):
            tokens.tolist()  # the one host sync per step, as in generation
            stamps.append(time.perf_counter())
    n = len(stamps)
    return Trial(
        prompt_tokens=len(ids),
        generated_tokens=n,
        tokenize_s=tokenized - start,
        ttft_s=stamps[0] - start,
        prefill_tps=batch * len(ids) / (stamps[0] - tokenized),
        decode_tps=batch * (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def speculative_trial(model: Any, draft: Any, tokenizer: Any, text: str, gen_tokens: int,
                      num_draft_tokens: int) -> dict[str, float]:
    """One greedy speculative generation of ``gen_tokens`` (EOS ignored): decode tok/s from the first
    token to the last, and the share of draft tokens the model kept."""
    from ..engine.speculative import speculative_generate_step

    mx.synchronize()
    start = time.perf_counter()
    stats: dict[str, int] = {}
    stamps = []
    with wired_limit(model):
        for _ in speculative_generate_step(mx.array(tokenizer.encode(text), dtype=mx.int32), model, draft,
                                           num_draft_tokens=num_draft_tokens, max_tokens=gen_tokens, stats=stats):
            stamps.append(time.perf_counter())
    return {"ttft_s": stamps[0] - start, "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "acceptance": stats["accepted"] / max(stats["proposed"], 1)}


def bench_speculative(model: Any, draft: Any, tokenizer: Any, lengths: list[int], gen_tokens: int, trials: int,
                      num_draft_tokens: int, on_trial: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Decode speed with and without the draft model, alternated trial by trial (medians), per prompt."""
    rows = []
    for p in lengths:
        text = prompt_text(tokenizer, p)
        run_trial(model, tokenizer, text, 2)
        speculative_trial(model, draft, tokenizer, text, 2, num_draft_tokens)  # warm-up
        plain, spec = [], []
        for _ in range(trials):
            plain.append(run_trial(model, tokenizer, text, gen_tokens).decode_tps)
            spec.append(speculative_trial(model, draft, tokenizer, text, gen_tokens, num_draft_tokens))
            if on_trial:
                on_trial()
        base = statistics.median(plain)
        fast = statistics.median(t["decode_tps"] for t in spec)
        rows.append({"prompt_tokens": p, "decode_tps": base, "speculative_decode_tps": fast, "speedup": fast / base,
                     "acceptance": statistics.median(t["acceptance"] for t in spec),
                     "num_draft_tokens": num_draft_tokens})
    return rows


def summary(values: Iterable[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


@dataclass
class LengthResult:
    prompt_tokens: int
    ttft_s: dict[str, float]
    prefill_tps: dict[str, float]
    decode_tps: dict[str, float] | None
    peak_memory_gb: dict[str, float]
    weight_bytes_per_step: int
    kv_bytes_per_step: int  # at the middle of the decode run
    decode_gbps: float | None
    decode_pct_of_peak: float | None
    prefill_gflops: float
    prefill_pct_of_peak: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def activation_dtype(model: Any) -> mx.Dtype:
    """The dtype activations, and so the KV cache, take in this model."""
    return model.embed(mx.array([[0]])).dtype


def bench_length(model: Any, tokenizer: Any, prompt_tokens: int, gen_tokens: int, trials: int,
                 peaks: dict[str, Any], batch: int = 1, on_trial: Callable[[], None] | None = None,
                 kv: KVSettings | None = None) -> LengthResult:
    """Warm up once, then ``trials`` timed runs at one prompt length, with bandwidth and FLOP/s."""
    text = prompt_text(tokenizer, prompt_tokens)
    run_trial(model, tokenizer, text, min(gen_tokens, 2), batch, kv=kv)  # warm-up: kernels, allocator
    runs = []
    for _ in range(trials):
        runs.append(run_trial(model, tokenizer, text, gen_tokens, batch, kv=kv))
        if on_trial:
            on_trial()
    p = runs[0].prompt_tokens
    weights = decode_weight_bytes(model, batch)
    kv_step = kv_bytes(model, p + gen_tokens // 2, batch, kv=kv)
    decode = summary(r.decode_tps for r in runs)
    steps_per_s = decode["median"] / batch if decode else None
    gbps = (weights + kv_step) * steps_per_s / 1e9 if steps_per_s else None
    prefill = summary(r.prefill_tps for r in runs)
    gflops = prefill_flops(model, p) / p * prefill["median"] / 1e9  # tok/s counts every row of the batch
    return LengthResult(
        prompt_tokens=p,
        ttft_s=summary(r.ttft_s for r in runs),
        prefill_tps=prefill,
        decode_tps=decode,
        peak_memory_gb=summary(r.peak_memory_gb for r in runs),
        weight_bytes_per_step=weights,
        kv_bytes_per_step=kv_step,
        decode_gbps=gbps,
        decode_pct_of_peak=100 * gbps / peaks["read_gbps"] if gbps else None,
        prefill_gflops=gflops,
        prefill_pct_of_peak=100 * gflops / peaks["matmul_gflops"],
        trials=[asdict(r) for r in runs],
    )


def _memory_for_kv(model: Any) -> float:
    """Bytes left for the KV cache: 80 % of the device's memory minus the weights."""
    return backend.device_memory() * 0.8 - decode_weight_bytes(model)


def sweep_lengths(model: Any, batch: int = 1, top: int = 32768, kv: KVSettings | None = None) -> list[int]:
    """Default context sweep: powers of two from 1K up to 32K, the model's context, or what the KV
    cache can hold in the memory left after the weights."""
    cfg = model.config
    free = _memory_for_kv(model)
    lengths, c = [], 1024
    while c <= min(top, cfg.max_position_embeddings - 64):
        if kv_bytes(model, c, batch, kv=kv) > free:
            break
        lengths.append(c)
        c *= 2
    return lengths


def check_lengths(model: Any, lengths: list[int], gen_tokens: int, batch: int, kv: KVSettings | None = None) -> None:
    """Refuse prompt lengths the model's context or the memory cannot take, in one line."""
    cfg = model.config
    free = _memory_for_kv(model)
    for p in lengths:
        if p <= 0:
            raise UserError(f"prompt lengths must be positive, got {p}")
        if p + gen_tokens > cfg.max_position_embeddings:
            raise UserError(f"{p} prompt + {gen_tokens} generated tokens exceed the model's context "
                            f"of {cfg.max_position_embeddings}")
        need = kv_bytes(model, p + gen_tokens, batch, kv=kv)
        if need > free:
            raise UserError(f"a {p}-token prompt needs {need / 2**30:.1f} GiB of KV cache; "
                            f"about {max(free, 0) / 2**30:.1f} GiB is free after the weights")


# --- the whole run, and its report ----------------------------------------------------------------


def run_bench(model_spec: str | None, *, compute: str = "auto", lengths: list[int], gen_tokens: int = 128,
              trials: int = 5, batch: int = 1, sweep: list[int] | None = (), sweep_gen: int = 16,
              peers: Sequence[str] = (), kv: KVSettings | None = None, draft_model: str | None = None,
              num_draft_tokens: int = 3) -> dict[str, Any]:
    """Load the model, measure the device's peaks, time every prompt length, the context sweep
    (``None``: the default lengths) and the peers; return every number with the machine.
    ``kv`` says how the KV cache of the global attention layers is stored. ``draft_model`` adds speculative decoding's speed and
    acceptance next to the plain decode, alternated trial by trial."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..formats.loader import load
    from ..formats.hub import resolve
    from .peers import compare

    path = resolve(model_spec)
    model, tokenizer = load(path, compute=compute)
    draft = None
    if draft_model is not None:
        from ..engine.speculative import check_draft
        from ..formats.loader import load_draft

        draft = load_draft(draft_model, compute, tokenizer)
        check_draft(model, draft, max(lengths) + gen_tokens)
    report_line = model.load_report
    kv = (kv or KVSettings()).checked(model.config)
    check_lengths(model, lengths, gen_tokens, batch, kv)
    sweep = sweep_lengths(model, batch, kv=kv) if sweep is None else list(sweep)
    check_lengths(model, sweep, sweep_gen, batch, kv)
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    step_weights = decode_weight_bytes(model, batch)
    n_peers = len(peers) + 1 if peers else 0
    total = len(lengths) * trials * (1 + n_peers + (draft is not None)) + len(sweep) + 1
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("measuring peaks", total=total)
        dtype = activation_dtype(model)
        peaks = measure_peaks(dtype)
        progress.advance(task)
        results = []
        for p in lengths:
            progress.update(task, description=f"prompt {p}")
            results.append(bench_length(model, tokenizer, p, gen_tokens, trials, peaks, batch,
                                        on_trial=lambda: progress.advance(task), kv=kv))
        points = []
        for c in sweep:
            progress.update(task, description=f"sweep {c}")
            t = run_trial(model, tokenizer, prompt_text(tokenizer, c), sweep_gen, batch, kv=kv)
            step_bytes = step_weights + kv_bytes(model, c + sweep_gen // 2, batch, kv=kv)
            points.append({**asdict(t), "context": t.prompt_tokens,
                           "decode_gbps": step_bytes * t.decode_tps / batch / 1e9 if t.decode_tps else None})
            progress.advance(task)
        speculative = None
        if draft is not None:
            progress.update(task, description="speculative")
            speculative = bench_speculative(model, draft, tokenizer, lengths, gen_tokens, trials, num_draft_tokens,
                                            on_trial=lambda: progress.advance(task))
            del draft
        peer_report = None
        if peers:
            del model  # the peers' processes need the memory
            progress.update(task, description="peers")
            peer_report = compare(report_line.path, report_line.format, list(peers), lengths, gen_tokens, trials,
                                  compute, on_trial=lambda: progress.advance(task))
    published = published_bandwidth()
    return {
        "machine": {**backend.describe(), "peaks": peaks,
                    "published_gbps": {"chip": published[0], "gbps": published[1]} if published else None},
        "model": {"path": str(report_line.path), "format": report_line.format, "weights": report_line.target,
                  "detail": report_line.detail, "weight_bytes": weight_bytes, "decode_weight_bytes": step_weights,
                  "load_s": report_line.seconds, "activation_dtype": str(dtype).removeprefix("mlx.core.")},
        "settings": {"prompt_lengths": lengths, "gen_tokens": gen_tokens, "trials": trials, "batch_size": batch,
                     "sweep_gen_tokens": sweep_gen, "kv_bits": kv.bits, "kv_group_size": kv.group_size if kv.quantized else None,
                     "quantized_kv_start": kv.start if kv.quantized else None},
        "results": [asdict(r) for r in results],
        "sweep": points,
        "compare": peer_report,
        "speculative": speculative and {"draft_model": str(draft_model), "rows": speculative},
    }


def _span(s: dict[str, float] | None, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    if not s:
        return "-"
    return f"{fmt.format(s['median'] * scale)} [{fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)}]"


def print_report(report: dict[str, Any]) -> None:
    """The readable tables: per prompt length, the sweep, and the side-by-side comparison."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped to a file: keep each row on one line
        console.width = 180
    m, model, peaks = report["machine"], report["model"], report["machine"]["peaks"]
    console.print(f"[bold]{model['path']}[/] ({model['format']}, weights {model['weights']}, "
                  f"activations {model['activation_dtype']}, loaded in {model['load_s']:.2f} s)")
    published = f"; Apple's figure {m['published_gbps']['gbps']} GB/s" if m.get("published_gbps") else ""
    console.print(f"{m['processor']} · {m['cores']} cores · {m['memory_gb']} GB · MLX {m['mlx']} {m['backend']}"
                  f" (BLAS {m['blas']}) · measured read {peaks['read_gbps']:.1f} GB/s ({peaks['read_method']}), "
                  f"copy {peaks['copy_gbps']:.1f} GB/s, {peaks['dtype']} matmul {peaks['matmul_gflops']:.0f} "
                  f"GFLOP/s{published}")
    s = report["settings"]
    table = Table(title=f"median [min-max] of {s['trials']} trials, {s['gen_tokens']} generated tokens, "
                        f"batch {s['batch_size']}")
    for col in ("prompt", "TTFT ms", "prefill tok/s", "decode tok/s", "peak GB", "decode GB/s", "% read peak",
                "prefill GFLOP/s", "% matmul peak"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(str(r["prompt_tokens"]), _span(r["ttft_s"], "{:.0f}", 1000), _span(r["prefill_tps"]),
                      _span(r["decode_tps"]), _span(r["peak_memory_gb"], "{:.2f}"),
                      f"{r['decode_gbps']:.2f}" if r["decode_gbps"] else "-",
                      f"{r['decode_pct_of_peak']:.0f}%" if r["decode_pct_of_peak"] else "-",
                      f"{r['prefill_gflops']:.1f}", f"{r['prefill_pct_of_peak']:.0f}%")
    console.print(table)
    if report["sweep"]:
        sweep = Table(title="context sweep (one trial each)")
        for col in ("context", "TTFT s", "decode tok/s", "decode GB/s", "peak GB"):
            sweep.add_column(col, justify="right")
        for pt in report["sweep"]:
            sweep.add_row(str(pt["context"]), f"{pt['ttft_s']:.2f}", f"{pt['decode_tps']:.1f}",
                          f"{pt['decode_gbps']:.2f}", f"{pt['peak_memory_gb']:.2f}")
        console.print(sweep)
    spec = report.get("speculative")
    if spec:
        t = Table(title=f"speculative decoding with {spec['draft_model']} (greedy; alternated, medians)")
        for col in ("prompt", "draft tokens", "acceptance", "decode tok/s", "with draft tok/s", "speedup"):
            t.add_column(col, justify="right")
        for r in spec["rows"]:
            t.add_row(str(r["prompt_tokens"]), str(r["num_draft_tokens"]), f"{r['acceptance']:.0%}",
                      f"{r['decode_tps']:.1f}", f"{r['speculative_decode_tps']:.1f}", f"{r['speedup']:.2f}x")
        console.print(t)
    peers = report.get("compare")
    if peers:
        cmp = Table(title=f"side by side: separate processes, alternated, median of {peers['trials']} "
                          "(prompt fed as token ids)")
        for col in ("prompt", "runtime", "TTFT ms", "prefill tok/s", "decode tok/s", "mlxllm x prefill",
                    "mlxllm x decode"):
            cmp.add_column(col, justify="right")
        for row in peers["rows"]:
            for name, v in row["runtimes"].items():
                ratio = row["ratios"].get(name, {})
                cmp.add_row(str(row["prompt_tokens"]), name, f"{v['ttft_s'] * 1000:.0f}", f"{v['prefill_tps']:.1f}",
                            f"{v['decode_tps']:.1f}" if v["decode_tps"] else "-",
                            f"{ratio['prefill_tps']:.2f}x" if ratio.get("prefill_tps") else "",
                            f"{ratio['decode_tps']:.2f}x" if ratio.get("decode_tps") else "")
        console.print(cmp)
        for note in peers["notes"]:
            console.print(f"note: {note}")


def plot_sweep(report: dict[str, Any], path: str) -> None:
    """Decode tok/s and TTFT against context length, as a PNG."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["sweep"]
    ctx = [p["context"] for p in pts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ctx, [p["decode_tps"] for p in pts], marker="o")
    ax1.set(xscale="log", xlabel="context (tokens)", ylabel="decode tok/s", title="decode speed")
    ax2.plot(ctx, [p["ttft_s"] for p in pts], marker="o", color="tab:orange")
    ax2.set(xscale="log", xlabel="prompt (tokens)", ylabel="seconds", title="time to first token")
    fig.suptitle(f"{os.path.basename(report['model']['path'])} · {report['machine']['processor']} · "
                 f"MLX {report['machine']['mlx']} {report['machine']['backend']}", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
