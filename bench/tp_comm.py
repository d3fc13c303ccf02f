"""What tensor parallelism costs in communication: run under ``mlx.launch -n N`` (ring backend) to time
one all-reduce of a decode step's hidden state (what every layer does twice per token) for several
widths, then (rank 0) write the figures and a model of the per-token cost on real links.

    mlx.launch --backend ring -n 2 -- .venv/bin/python bench/tp_comm.py bench/results/tp_comm.json

Link figures used for the model (stated, not measured here): Thunderbolt 5 with RDMA (JACCL) 10 us per
all-reduce and 60 Gb/s; 10 GbE over TCP (ring) 50 us and 9 Gb/s. A ring all-reduce moves 2 (N-1)/N of
the message per rank.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import mlxllm  # noqa: F401  (BLAS preload)
import mlx.core as mx

LINKS = {"thunderbolt5_rdma": (10e-6, 60e9 / 8), "10gbe_tcp": (50e-6, 9e9 / 8)}
# (name, layers, hidden) of models people split over Macs, bf16 activations
MODELS = [("Llama-3.3-70B", 80, 8192), ("Qwen3-235B-A22B", 94, 4096), ("GLM-4.6", 92, 5120)]


def _time_all_reduce(group, width: int, repeats: int = 200) -> float:
    x = mx.ones((1, width), mx.float32)
    for _ in range(20):
        mx.eval(mx.distributed.all_sum(x, group=group))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    group = mx.distributed.init()
    n = group.size()
    measured = {w: _time_all_reduce(group, w) for w in (576, 2048, 4096, 8192)}
    if group.rank() != 0:
        return
    model = {}
    for link, (latency, bandwidth) in LINKS.items():
        for name, layers, hidden in MODELS:
            per = latency + 2 * (n - 1) / n * hidden * 2 / bandwidth  # one bf16 all-reduce
            model[f"{name} @ {link}"] = {"all_reduces_per_token": 2 * layers, "ms_per_token": 2 * layers * per * 1e3}
    report = {"ranks": n, "backend": "ring over loopback (this machine: 2-core AMD EPYC, ranks share the cores)",
              "all_reduce_us_median": {str(w): round(t * 1e6, 1) for w, t in measured.items()},
              "links_assumed": {k: {"latency_us": v[0] * 1e6, "gbit_s": v[1] * 8 / 1e9} for k, v in LINKS.items()},
              "model": model}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
