"""Side-by-side generation speed: mlxllm against its peers on the same checkpoint.

Each trial is a fresh process (``bench/run_one.py``); runtimes alternate trial by trial so drift in
the machine hits all of them alike; the table reports medians. Results go to a JSON file with the
machine description; ``bench/render.py`` turns result files into the README's table.

    python bench/compare.py --label "SmolLM2 bf16" --model ckpt/smollm2-bf16 --peers mlx_lm -n 5
    python bench/compare.py --label "SmolLM2 Q4_1 GGUF" --model SmolLM2.gguf --peers llama.cpp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ("ttft_s", "prefill_tps", "decode_tps", "load_s")


def machine() -> dict:
    import mlxllm

    return mlxllm.backend.describe()


def trial(runtime: str, model: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / "run_one.py"), "--runtime", runtime, "--model", model,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{runtime} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--model", required=True, help="checkpoint for mlxllm (and the peers unless --peer-model)")
    p.add_argument("--peer-model", default=None, help="the same weights in the peer's format, if different")
    p.add_argument("--peers", default="mlx_lm", help="comma list of mlx_lm, llama.cpp")
    p.add_argument("-n", "--trials", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--compute", default="auto")
    p.add_argument("--mlx-lm-openblas", action="store_true")
    p.add_argument("--out", default=None, help="JSON results file (default bench/results/<label>.json)")
    args = p.parse_args()

    runtimes = ["mlxllm"] + [r for r in args.peers.split(",") if r]
    extra = {"mlxllm": ["--compute", args.compute], "mlx_lm": ["--openblas"] if args.mlx_lm_openblas else [],
             "llama.cpp": ["--threads", str(os.cpu_count())]}
    runs: dict[str, list[dict]] = {r: [] for r in runtimes}
    for i in range(args.trials):
        for r in runtimes if i % 2 == 0 else runtimes[::-1]:
            model = args.model if r == "mlxllm" else (args.peer_model or args.model)
            runs[r].append(trial(r, model, args, extra[r]))
            print(f"trial {i + 1}/{args.trials} {r}: " + ", ".join(
                f"{k}={runs[r][-1][k]:.3g}" for k in METRICS if runs[r][-1].get(k) is not None), file=sys.stderr)

    summary = {}
    for r, rs in runs.items():
        summary[r] = {k: statistics.median(x[k] for x in rs) for k in METRICS if rs[0].get(k) is not None}
        summary[r]["min_max"] = {k: [min(x[k] for x in rs), max(x[k] for x in rs)] for k in METRICS
                                 if rs[0].get(k) is not None}
        summary[r]["details"] = {k: v for k, v in rs[-1].items() if k not in METRICS}
    base = summary["mlxllm"]
    for r in runtimes[1:]:
        summary[r]["mlxllm_speedup"] = {
            "prefill": base["prefill_tps"] / summary[r]["prefill_tps"],
            "decode": base["decode_tps"] / summary[r]["decode_tps"],
        }
        print(f"{args.label}: mlxllm vs {r}: prefill x{summary[r]['mlxllm_speedup']['prefill']:.2f}, "
              f"decode x{summary[r]['mlxllm_speedup']['decode']:.2f}")
    record = {"label": args.label, "model": args.model, "peer_model": args.peer_model or args.model,
              "trials": args.trials, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
              "machine": machine(), "summary": summary, "runs": runs}
    out = Path(args.out or HERE / "results" / (args.label.replace(" ", "_").replace("/", "_") + ".json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(record, f, indent=1)
    os.replace(f.name, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
