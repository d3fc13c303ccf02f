"""``mlxllm bench --compare``: mlxllm and its peers (mlx-lm, llama.cpp) side by side on the same weights.

Each measurement is a fresh process running ``bench/peer_trial.py`` from the source checkout, which
times every runtime the same way from outside; runtimes alternate round by round so drift in the
machine hits all alike. mlxllm never imports a peer: only that benchmark script does, in the child.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError

PEERS = {"mlx-lm": ("mlx_lm", "mlx-lm"), "llama.cpp": ("llama_cpp", "llama-cpp-python")}  # module, package
TRIAL_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "peer_trial.py"


def check_peers(peers: list[str]) -> None:
    """Refuse unknown peers, or a compare this installation cannot run, before any measuring starts."""
    for peer in peers:
        if peer not in PEERS:
            raise UserError(f"unknown peer '{peer}' (known: {', '.join(PEERS)})")
    if peers and not TRIAL_SCRIPT.exists():
        raise UserError("--compare runs bench/peer_trial.py from a source checkout of mlxllm "
                        "(git clone, then pip install -e .); this installation has none")


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None when it can."""
    module, package = PEERS[peer]
    if importlib.util.find_spec(module) is None:
        return f"{peer} skipped: {package} is not installed (pip install {package})"
    return None


def trial(runtime: str, model: str, prompt_tokens: int, gen_tokens: int, extra: Iterable[str] = ()) -> dict[str, Any]:
    """Run one measurement of ``runtime`` in a child process and return its JSON record."""
    cmd = [sys.executable, str(TRIAL_SCRIPT), "--runtime", runtime, "--model", model,
           "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{runtime} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def compare(model: Path, fmt: str, peers: list[str], lengths: list[int], gen_tokens: int, trials: int,
            compute: str = "auto", on_trial: Callable[[], None] | None = None) -> dict[str, Any]:
    """mlxllm against ``peers`` on the same weights: per prompt length, ``trials`` rounds in which every
    runtime runs once in its own process, the order rotating each round; medians and mlxllm/peer ratios.

    mlx-lm gets the same directory, or for a GGUF file mlxllm's lossless conversion of it (the file's
    quantized weights as MLX arrays); llama.cpp reads GGUF files only."""
    from .. import backend

    notes: list[str] = []
    extra: dict[str, list[str]] = {"mlxllm": ["--compute", compute], "mlx-lm": [], "llama.cpp": []}
    if backend.blas_library:
        extra["mlx-lm"].append("--openblas")
    targets = {"mlxllm": str(model)}
    with tempfile.TemporaryDirectory(prefix="mlxllm-bench-") as tmp:
        for peer in peers:
            why = missing(peer)
            if why:
                notes.append(why)
            elif peer == "llama.cpp" and fmt != "gguf":
                notes.append("llama.cpp skipped: it reads GGUF files only")
            elif peer == "mlx-lm" and fmt == "gguf":
                from ..formats.save import save_model
                from ..formats.loader import load_model

                try:
                    targets[peer] = str(save_model(load_model(model, compute="native"), Path(tmp) / "mlx"))
                    notes.append("mlx-lm reads mlxllm's lossless conversion of the GGUF file (same quantized weights)")
                except Exception as e:  # a model mlx-lm's layout cannot express: say so, keep going
                    notes.append(f"mlx-lm skipped: the GGUF could not be converted for it ({e})")
            else:
                targets[peer] = str(model)
        rows = []
        for p in lengths:
            runs: dict[str, list[dict[str, Any]]] = {r: [] for r in targets}
            names = list(targets)
            for i in range(trials):
                for r in names[i % len(names):] + names[: i % len(names)]:
                    runs[r].append(trial(r, targets[r], p, gen_tokens, extra[r]))
                    if on_trial:
                        on_trial()
            row: dict[str, Any] = {"prompt_tokens": p, "runtimes": {}}
            for r, rs in runs.items():
                row["runtimes"][r] = {k: _median(rs, k) for k in ("ttft_s", "prefill_tps", "decode_tps", "load_s")}
                row["runtimes"][r]["trials"] = rs
            ours = row["runtimes"]["mlxllm"]
            row["ratios"] = {
                r: {k: ours[k] / v[k] if ours[k] and v[k] else None for k in ("prefill_tps", "decode_tps")}
                for r, v in row["runtimes"].items() if r != "mlxllm"
            }
            rows.append(row)
    return {"runtimes": list(targets), "notes": notes, "rows": rows, "gen_tokens": gen_tokens, "trials": trials}


