"""Render ``bench/results/*.json`` (from compare.py) as the README's markdown performance table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(record: dict) -> list[str]:
    s = record["summary"]
    out = []
    for runtime, r in s.items():
        ratio = r.get("mlxllm_speedup")
        out.append(
            f"| {record['label']} | {runtime} | {r['ttft_s'] * 1000:.0f} | {r['prefill_tps']:.1f} | "
            f"{r['decode_tps']:.1f} | "
            + (f"{ratio['prefill']:.2f}x / {ratio['decode']:.2f}x" if ratio else "—")
            + f" | {r['details'].get('weights', r['details'].get('blas', '')) or ''} |"
        )
    return out


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths] or sorted((HERE / "results").glob("*.json"))
    records = [json.loads(f.read_text()) for f in files]
    if not records:
        raise SystemExit("no results: run bench/compare.py first")
    m = records[0]["machine"]
    print(f"Machine: {m['processor']}, {m['cores']} cores, backend {m['backend']}, BLAS {m['blas']}, "
          f"MLX {m['mlx']}, {m['platform']}. "
          f"{records[0]['prompt_tokens']}-token prompt, {records[0]['gen_tokens']} generated tokens, "
          f"greedy; medians of {records[0]['trials']} alternated trials, each in its own process.\n")
    print("| checkpoint | runtime | TTFT ms | prefill tok/s | decode tok/s | mlxllm speed-up (prefill / decode) | path |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in records:
        print("\n".join(rows(r)))


if __name__ == "__main__":
    main(sys.argv[1:])
