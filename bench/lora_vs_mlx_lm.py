"""LoRA training speed and memory: ``mlxllm lora`` against ``mlx_lm.lora`` on the same model, data and
hyperparameters, each run in its own process, runtimes alternated, medians over ``--trials``.

The model is SmolLM2-135M-Instruct as a float32 Hugging Face directory (written from the bundled GGUF
on first use), the data the extraction task of ``bench/lora_smollm2.py`` (chat template, prompt
masked). Both get rank 8 with update scale 2.0 (mlxllm: alpha 16), the last 16 blocks, all seven
linear maps, batch 8, constant learning rate 1e-4, and the system OpenBLAS. Tokens/s counts every
non-padding input token (mlx-lm's definition); peak memory is MLX's own peak.

    python bench/lora_vs_mlx_lm.py --iters 20 --trials 1 --out bench/results/lora_vs_mlx_lm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "ckpt" / "smollm2-135m-f32"
# mlx_lm.lora as its command line runs it, with its training reports captured as JSON lines.
MLX_LM = """import ctypes, json, sys
ctypes.CDLL("libopenblas.so.0", mode=ctypes.RTLD_GLOBAL)
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Capture(TrainingCallback):
    def on_train_loss_report(self, info):
        print("REPORT " + json.dumps({k: float(v) for k, v in info.items()}), flush=True)

lora.get_reporting_callbacks = lambda *a, **k: Capture()
sys.argv = ["mlx_lm.lora"] + sys.argv[1:]
lora.main()
"""


def ensure_model() -> None:
    if (MODEL / "config.json").exists():
        return
    import mlx.core as mx

    sys.path.insert(0, str(HERE))
    from make_checkpoints import write_hf_dir

    from mlxllm.formats.hub import default_model_path

    write_hf_dir(default_model_path(), MODEL, mx.float32)


def run_mlxllm(data: Path, iters: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mlxllm", "lora", "-m", str(MODEL), "--data", str(data), "--train", "--iters", str(iters),
           "--batch-size", "8", "--learning-rate", "1e-4", "--lora-rank", "8", "--lora-alpha", "16", "--lora-layers", "16",
           "--mask-prompt", "--steps-per-report", str(iters), "--steps-per-eval", str(10 * iters), "--val-batches", "1",
           "--save-every", str(10 * iters), "--adapter-path", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    reports = json.loads(proc.stdout)["reports"]
    last = [r for r in reports if "tokens_per_s" in r][-1]
    return {"tokens_per_s": last["tokens_per_s"], "peak_memory_gb": max(r["peak_memory_gb"] for r in reports)}


def run_mlx_lm(data: Path, iters: int, out: Path) -> dict:
    config = out.with_suffix(".yaml")
    config.write_text("lora_parameters:\n  rank: 8\n  scale: 2.0\n  dropout: 0.0\n")
    cmd = [sys.executable, "-c", MLX_LM, "--model", str(MODEL), "--data", str(data), "--train", "--iters", str(iters),
           "--batch-size", "8", "--learning-rate", "1e-4", "--num-layers", "16", "--mask-prompt",
           "--steps-per-report", str(iters), "--steps-per-eval", str(10 * iters), "--val-batches", "1",
           "--save-every", str(10 * iters), "--adapter-path", str(out), "-c", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    last = [json.loads(x[len("REPORT "):]) for x in proc.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return {"tokens_per_s": last["tokens_per_second"], "peak_memory_gb": last["peak_memory"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--out", default="bench/results/lora_vs_mlx_lm.json")
    args = p.parse_args()
    ensure_model()
    sys.path.insert(0, str(HERE))
    from lora_smollm2 import extract_data

    rows: dict[str, list[dict]] = {"mlxllm": [], "mlx-lm": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        extract_data(data, 400, 50, 60)
        for t in range(args.trials):
            order = ["mlxllm", "mlx-lm"] if t % 2 == 0 else ["mlx-lm", "mlxllm"]
            for name in order:
                fn = run_mlxllm if name == "mlxllm" else run_mlx_lm
                r = fn(data, args.iters, Path(tmp) / f"{name}-{t}")
                rows[name].append(r)
                print(name, json.dumps(r), flush=True)
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_memory_gb")}
               for name, rs in rows.items()}
    summary["ratio_tokens_per_s"] = summary["mlxllm"]["tokens_per_s"] / summary["mlx-lm"]["tokens_per_s"]
    summary["ratio_peak_memory"] = summary["mlxllm"]["peak_memory_gb"] / summary["mlx-lm"]["peak_memory_gb"]
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"iters": args.iters, "trials": rows, "summary": summary}, indent=2))
    tmp_out.replace(out)


if __name__ == "__main__":
    main()
