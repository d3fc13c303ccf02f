"""Distil SmolLM2-135M-Instruct (30 blocks) into a layer-pruned student (15 blocks: every second one,
the last moved to the teacher's last) on Python's documentation (``pydoc_data.topics``) plus the
teacher's own continuations of training prompts (``--seq-level``), with ``mlxllm distill`` as a user
would run it. Held-out topics give top-1 agreement with the teacher, KL and perplexity before and
after. The student is kept in bench/ckpt for bench/speculative_smollm2.py.

    python bench/distill_smollm2.py --out bench/results/distill_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lora_smollm2 import pydoc_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--train-chunks", type=int, default=320, help="Training pieces of ~256 tokens kept.")
    p.add_argument("--test-chunks", type=int, default=48)
    p.add_argument("--seq-level", type=int, default=32, help="Teacher tokens written per training prompt.")
    p.add_argument("--student", default=str(HERE / "ckpt" / "smollm2-distilled-15l"))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import mlxllm  # noqa: F401
    from mlxllm.files import write_atomic
    from mlxllm.formats.hub import default_model_path
    from mlxllm.tokenize import Tokenizer

    teacher = default_model_path()
    tok = Tokenizer.from_gguf(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        splits = pydoc_data(data, tok, 256, 10)
        keep = {"train": args.train_chunks, "valid": 16, "test": args.test_chunks}
        for split, n in keep.items():
            rows = splits[split][:: max(1, len(splits[split]) // n)][:n]
            (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        cmd = [sys.executable, "-m", "mlxllm", "distill", "--teacher", str(teacher), "--student-init",
               "prune:every-2nd-layer", "--data", str(data), "--out", args.student, "--force", "--eval",
               "--seq-level", str(args.seq_level), "--iters", str(args.iters), "--batch-size", str(args.batch_size),
               "--learning-rate", str(args.learning_rate), "--lr-schedule", "cosine", "--warmup", "10",
               "--max-seq-length", "320", "--steps-per-eval", str(args.iters), "--save-every", str(args.iters),
               "--teacher-cache", str(HERE / "ckpt" / "teacher-cache"), "--json"]
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
    if run.returncode:
        sys.exit(run.returncode)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    reports = result.pop("reports")
    trains = [r for r in reports if "train_loss" in r]
    summary = {
        "machine": platform.processor() or platform.machine(), "wall_seconds": seconds,
        "settings": {k: getattr(args, k) for k in ("iters", "batch_size", "learning_rate", "train_chunks",
                                                   "test_chunks", "seq_level")} | {"temperature": 2.0, "alpha": 0.5,
                                                                                    "top_k": 64},
        "tokens_per_s": sum(r["tokens_per_s"] for r in trains) / len(trains),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in reports),
        "val_loss": [r["val_loss"] for r in reports if "val_loss" in r],
        **result,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        write_atomic(args.out, json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
