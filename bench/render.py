"""Render ``mlxllm bench --json`` reports as the README's markdown tables.

    python bench/render.py bench/results/*.json > bench/results/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _name(report: dict) -> str:
    return f"{Path(report['model']['path']).name} ({report['model']['weights']})"


def machine_line(report: dict) -> str:
    m, p = report["machine"], report["machine"]["peaks"]
    return (f"Machine: {m['processor']}, {m['cores']} cores, {m['memory_gb']} GB, {m['platform']}; MLX {m['mlx']} "
            f"({m['backend']} backend, BLAS {m['blas']}). Measured by MLX on it: read {p['read_gbps']:.1f} GB/s "
            f"({p['read_method']}), copy {p['copy_gbps']:.1f} GB/s, {p['dtype']} matmul {p['matmul_gflops']:.0f} GFLOP/s.")


def compare_table(reports: list[dict]) -> list[str]:
    out = ["| checkpoint | prompt | runtime | TTFT ms | prefill tok/s | decode tok/s | mlxllm × (prefill / decode) |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for rep in reports:
        cmp = rep.get("compare")
        if not cmp:
            continue
        for row in cmp["rows"]:
            for runtime, v in row["runtimes"].items():
                ratio = row["ratios"].get(runtime)
                ratio_s = f"{ratio['prefill_tps']:.2f}× / {ratio['decode_tps']:.2f}×" if ratio else "—"
                out.append(f"| {_name(rep)} | {row['prompt_tokens']} | {runtime} | {v['ttft_s'] * 1000:.0f} | "
                           f"{v['prefill_tps']:.1f} | {v['decode_tps']:.1f} | {ratio_s} |")
    return out


def bandwidth_table(reports: list[dict]) -> list[str]:
    out = ["| checkpoint | prompt | TTFT ms | prefill tok/s | decode tok/s | bytes/token | decode GB/s | % of read peak | prefill GFLOP/s | % of matmul peak |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rep in reports:
        for r in rep["results"]:
            step = r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
            out.append(f"| {_name(rep)} | {r['prompt_tokens']} | {r['ttft_s']['median'] * 1000:.0f} | "
                       f"{r['prefill_tps']['median']:.1f} | {r['decode_tps']['median']:.2f} | {step / 1e6:.0f} MB | "
                       f"{r['decode_gbps']:.2f} | {r['decode_pct_of_peak']:.0f}% | {r['prefill_gflops']:.1f} | "
                       f"{r['prefill_pct_of_peak']:.0f}% |")
    return out


def sweep_table(reports: list[dict]) -> list[str]:
    out = ["| checkpoint | context | TTFT s | decode tok/s | decode GB/s |", "|---|---:|---:|---:|---:|"]
    for rep in reports:
        for pt in rep.get("sweep") or []:
            out.append(f"| {_name(rep)} | {pt['context']} | {pt['ttft_s']:.2f} | {pt['decode_tps']:.1f} | "
                       f"{pt['decode_gbps']:.2f} |")
    return out if len(out) > 2 else []


def main(paths: list[str]) -> None:
    loaded = [json.loads(Path(p).read_text()) for p in paths if p.endswith(".json")]
    reports = [r for r in loaded if "machine" in r and "results" in r]  # `mlxllm bench` reports only
    if not reports:
        raise SystemExit("no reports given: run bench/run_all.sh (or mlxllm bench --json) first")
    print(machine_line(reports[0]) + "\n")
    for table in (compare_table(reports), bandwidth_table(reports), sweep_table(reports)):
        if len(table) > 2:
            print("\n".join(table) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
