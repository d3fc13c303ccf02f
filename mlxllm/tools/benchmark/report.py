"""How ``mlxllm bench`` shows its numbers: the readable tables (per prompt length, the context sweep,
speculative decoding, the side-by-side peers) and the sweep's PNG.

Everything here reads the plain dict ``run_bench`` returns (the same one ``--json`` writes), so a
saved report can be shown or plotted again without re-measuring.
"""

from __future__ import annotations

from typing import Any

from ...files import write_atomic


def _span(s: dict[str, float] | None, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    if not s:
        return "-"
    return f"{fmt.format(s['median'] * scale)} [{fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)}]"


def _table(title: str, columns: tuple[str, ...]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    return table


def _header_lines(report: dict[str, Any]) -> list[str]:
    m, model, peaks = report["machine"], report["model"], report["machine"]["peaks"]
    published = f"; Apple's figure {m['published_gbps']['gbps']} GB/s" if m.get("published_gbps") else ""
    return [
        f"[bold]{model['path']}[/] ({model['format']}, weights {model['weights']}, "
        f"activations {model['activation_dtype']}, loaded in {model['load_s']:.2f} s)",
        f"{m['processor']} · {m['cores']} cores · {m['memory_gb']} GB · MLX {m['mlx']} {m['backend']}"
        f" (BLAS {m['blas']}) · measured read {peaks['read_gbps']:.1f} GB/s ({peaks['read_method']}), "
        f"copy {peaks['copy_gbps']:.1f} GB/s, {peaks['dtype']} matmul {peaks['matmul_gflops']:.0f} "
        f"GFLOP/s{published}",
    ]


def _lengths_table(report: dict[str, Any]) -> Any:
    s = report["settings"]
    table = _table(f"median [min-max] of {s['trials']} trials, {s['gen_tokens']} generated tokens, "
                   f"batch {s['batch_size']}",
                   ("prompt", "TTFT ms", "prefill tok/s", "decode tok/s", "peak GB", "decode GB/s", "% read peak",
                    "prefill GFLOP/s", "% matmul peak"))
    for r in report["results"]:
        table.add_row(str(r["prompt_tokens"]), _span(r["ttft_s"], "{:.0f}", 1000), _span(r["prefill_tps"]),
                      _span(r["decode_tps"]), _span(r["peak_memory_gb"], "{:.2f}"),
                      f"{r['decode_gbps']:.2f}" if r["decode_gbps"] else "-",
                      f"{r['decode_pct_of_peak']:.0f}%" if r["decode_pct_of_peak"] else "-",
                      f"{r['prefill_gflops']:.1f}", f"{r['prefill_pct_of_peak']:.0f}%")
    return table


def _sweep_table(points: list[dict[str, Any]]) -> Any:
    table = _table("context sweep (one trial each)", ("context", "TTFT s", "decode tok/s", "decode GB/s", "peak GB"))
    for pt in points:
        table.add_row(str(pt["context"]), f"{pt['ttft_s']:.2f}", f"{pt['decode_tps']:.1f}",
                      f"{pt['decode_gbps']:.2f}", f"{pt['peak_memory_gb']:.2f}")
    return table


def _speculative_table(spec: dict[str, Any]) -> Any:
    table = _table(f"speculative decoding with {spec['draft_model']} (greedy; alternated, medians)",
                   ("prompt", "draft tokens", "acceptance", "decode tok/s", "with draft tok/s", "speedup"))
    for r in spec["rows"]:
        table.add_row(str(r["prompt_tokens"]), str(r["num_draft_tokens"]), f"{r['acceptance']:.0%}",
                      f"{r['decode_tps']:.1f}", f"{r['speculative_decode_tps']:.1f}", f"{r['speedup']:.2f}x")
    return table


def _peers_table(peers: dict[str, Any]) -> Any:
    table = _table(f"side by side: separate processes, alternated, median of {peers['trials']} "
                   "(prompt fed as token ids)",
                   ("prompt", "runtime", "TTFT ms", "prefill tok/s", "decode tok/s", "mlxllm x prefill",
                    "mlxllm x decode"))
    for row in peers["rows"]:
        for name, v in row["runtimes"].items():
            ratio = row["ratios"].get(name, {})
            table.add_row(str(row["prompt_tokens"]), name, f"{v['ttft_s'] * 1000:.0f}", f"{v['prefill_tps']:.1f}",
                          f"{v['decode_tps']:.1f}" if v["decode_tps"] else "-",
                          f"{ratio['prefill_tps']:.2f}x" if ratio.get("prefill_tps") else "",
                          f"{ratio['decode_tps']:.2f}x" if ratio.get("decode_tps") else "")
    return table


def print_report(report: dict[str, Any]) -> None:
    """The readable tables: per prompt length, the sweep, and the side-by-side comparison."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped to a file: keep each row on one line
        console.width = 180
    for line in _header_lines(report):
        console.print(line)
    console.print(_lengths_table(report))
    if report["sweep"]:
        console.print(_sweep_table(report["sweep"]))
    if report.get("speculative"):
        console.print(_speculative_table(report["speculative"]))
    peers = report.get("compare")
    if peers:
        console.print(_peers_table(peers))
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
