"""KV-cache memory at long context: float vs 8-bit vs 4-bit cache, mlxllm and mlx-lm side by side.

    python bench/kv_memory.py --model bench/ckpt/llama-3.2-1b-4l-f32-random \\
        --lengths 8192,16384,32768 --peer-lengths 4096 --out bench/results/kv_memory.json

Every (runtime, cache, length) point is one fresh process (bench/peer_trial.py): the prompt in
chunks of 512, then 64 greedy tokens; peak memory is MLX's, from after a short warm-up. "cache +
attention" is the peak minus the weights: the KV cache plus everything attention holds at once
(on MLX's CPU backend a float cache's attention materializes each chunk's [heads, 512, S] scores).
Runtimes alternate within a length, so neither always runs on a warmer machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TRIAL = Path(__file__).resolve().parent / "peer_trial.py"
MODES = {"float": None, "8-bit": 8, "4-bit": 4}


def trial(runtime: str, model: str, length: int, bits: int | None, group: int, gen: int, timeout: int) -> dict:
    cmd = [sys.executable, str(TRIAL), "--runtime", runtime, "--model", model, "--prompt-tokens", str(length),
           "--gen-tokens", str(gen), "--prefill-step-size", "512", "--compute", "float32"]
    if bits:
        cmd += ["--kv-bits", str(bits), "--kv-group-size", str(group)]
    if runtime == "mlx-lm":
        cmd.append("--openblas")
    env = dict(os.environ)
    if runtime == "mlx-lm":
        # mlx-lm computes on its own generation stream; with a threaded OpenBLAS underneath, two MLX
        # threads calling BLAS at once deadlocked its process here twice (all threads in futex waits).
        env["OPENBLAS_NUM_THREADS"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """Markdown: per length and runtime, each cache's peak, cache + attention and its share of the float cache's."""
    ok = [r for r in rows if "error" not in r or not r["error"]]
    base = {(r["runtime"], r["length"]): r["cache_attention_gb"] for r in ok if r["cache"] == "float"}
    lines = ["| prompt | runtime | KV cache | peak GB | cache + attention GB | vs float cache | prefill tok/s | decode tok/s |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(ok, key=lambda r: (r["length"], r["runtime"] != "mlxllm", list(MODES).index(r["cache"]))):
        ref = base.get((r["runtime"], r["length"]))
        share = f"{r['cache_attention_gb'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['length']} | {r['runtime']} | {r['cache']} | {r['peak_memory_gb']:.2f} | "
                     f"{r['cache_attention_gb']:.3f} | {share} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--peer-lengths", default="4096", help="lengths also run with mlx-lm")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", default="bench/results/kv_memory.json")
    p.add_argument("--table", action="store_true", help="print the results already in --out as markdown")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())["rows"]))
        return
    lengths = sorted({int(x) for x in (args.lengths + "," + args.peer_lengths).split(",") if x})
    peer_lengths = {int(x) for x in args.peer_lengths.split(",") if x}
    out_path = Path(args.out)
    rows = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    done = {(r["runtime"], r["cache"], r["length"]) for r in rows if "error" not in r}
    for length in lengths:
        runtimes = ["mlxllm", "mlx-lm"] if length in peer_lengths else ["mlxllm"]
        for mode, bits in MODES.items():
            for runtime in runtimes:
                if (runtime, mode, length) in done:
                    continue
                r = trial(runtime, args.model, length, bits, args.group_size, args.gen_tokens, args.timeout)
                r.update(runtime=runtime, cache=mode, length=length, group_size=args.group_size if bits else None)
                if "peak_memory_gb" in r:
                    r["cache_attention_gb"] = r["peak_memory_gb"] - r["weights_gb"]
                rows.append(r)
                print(json.dumps({k: r.get(k) for k in ("runtime", "cache", "length", "peak_memory_gb",
                                                        "cache_attention_gb", "prefill_tps", "decode_tps", "error")}),
                      flush=True)
                tmp = out_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
                tmp.replace(out_path)


if __name__ == "__main__":
    main()
