"""Tensor and pipeline parallelism over MLX's ring backend on loopback, launched as users launch it
(``mlx.launch``): for tiny random models of each family the sharded logits equal the single-process ones, greedy
generations are identical, quantized weights shard as stored, each rank holds a fraction of the
weights, and models that cannot be split are refused with the counts that would work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_benchmark import tiny_dir  # noqa: F401  (fixture: a random llama + byte-level tokenizer on disk)

pytest.importorskip("mlx_lm")  # the families' configs come from the parity tests

HERE = Path(__file__).parent
TWO = ["llama", "mistral", "qwen3", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "phi3", "gpt_oss", "llama4",
       "glm4_moe", "ministral3", "smollm3", "llama:q4", "qwen3_moe:q4", "gpt_oss:q4"]
FOUR = ["llama", "mistral", "qwen2_moe", "llama4", "phi3", "deepseek_v3", "qwen3_5", "olmoe"]
# Pipeline parallel covers what tensor parallel does not yet (latent and linear attention) too.
PIPE_TWO = ["llama:pipe", "gemma3_text:pipe", "mixtral:pipe", "deepseek_v3:pipe", "qwen3_5:pipe", "llama4:pipe",
            "gpt_oss:pipe"]
PIPE_FOUR = ["llama:pipe", "qwen3_5:pipe", "deepseek_v2:pipe", "gemma4:pipe"]


def _launch(ranks: int, families: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"ranks{ranks}.json"
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher), "--backend", "ring", "-n", str(ranks), sys.executable, str(HERE / "dist_worker.py"), str(out),
           str(HERE), ",".join(families)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("ranks, families", [(2, TWO), (4, FOUR), (2, PIPE_TWO), (4, PIPE_FOUR)],
                         ids=["2-ranks", "4-ranks", "2-ranks-pipeline", "4-ranks-pipeline"])
def test_sharded_models_compute_what_one_process_does(ranks, families, tmp_path):
    results = _launch(ranks, families, tmp_path)
    refused = {"phi3": "4 ranks can neither split nor replicate", "deepseek_v3": "latent attention",
               "qwen3_5": "linear-attention layers", "olmoe": "q/k norms over all heads"} if families == FOUR else {}
    refused["gemma4"] = "KV-sharing layers"
    for spec in families:
        r = results[spec]
        family = spec.split(":")[0]
        if family in refused:
            assert refused[family] in r["error"], (spec, r)
            continue
        assert "error" not in r, (spec, r)
        assert r["diff"] <= 1e-5 * max(r["scale"], 1.0), (spec, r["diff"])
        assert r["ids"] == r["alone_ids"], spec
        before, after = r["bytes"]
        assert after < (0.8 if ranks == 2 else 0.6) * before, (spec, before, after)  # embeddings, head replicated


def test_generate_under_mlx_launch_prints_what_one_process_does(tiny_dir, tmp_path):
    """``mlx.launch -n 2 -- mlxllm generate`` loads, shards and decodes on both ranks; rank 0 alone prints,
    the same greedy text as one process; ``serve`` says it runs on one rank."""
    mlxllm = Path(sys.executable).parent / "mlxllm"
    args = ["generate", "-m", str(tiny_dir), "-p", "hello there", "-n", "12", "--temp", "0"]
    alone = subprocess.run([str(mlxllm), *args], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    launcher = Path(sys.executable).parent / "mlx.launch"
    both = subprocess.run([str(launcher), "--backend", "ring", "-n", "2", "--", str(mlxllm), *args], capture_output=True,
                          text=True, timeout=300)
    assert both.returncode == 0, both.stderr[-2000:]
    assert both.stdout.strip() == alone.stdout.strip() and alone.stdout.strip()
    serve = subprocess.run([str(launcher), "--backend", "ring", "-n", "2", "--", str(mlxllm), "serve", "-m", str(tiny_dir)],
                           capture_output=True, text=True, timeout=300)
    assert "serve runs on one rank" in serve.stderr  # (mlx.launch reports the ranks' exit codes, returns 0)


def test_a_rank_that_dies_mid_generation_ends_the_launch(tmp_path):
    """The other ranks do not hang: the launcher ends them and says which rank exited."""
    import time

    launcher = Path(sys.executable).parent / "mlx.launch"
    start = time.monotonic()
    done = subprocess.run([str(launcher), "--backend", "ring", "-n", "2", sys.executable, str(HERE / "dist_worker.py"),
                           str(tmp_path / "x.json"), str(HERE), "die"], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 100
    assert "rank 1 exited with code 3" in done.stderr, done.stderr[-1000:]


def test_info_gives_the_memory_per_rank_and_refuses_uneven_splits(tiny_dir):
    from mlxllm.errors import UserError
    from mlxllm.formats.loader import describe_model

    one, two = describe_model(tiny_dir), describe_model(tiny_dir, ranks=2)
    for target, need in two["memory_needed_per_rank_bytes"].items():
        assert need < one["memory_needed_bytes"][target]
    with pytest.raises(UserError, match=r"num_key_value_heads is 2: 3 ranks can neither split nor replicate"):
        describe_model(tiny_dir, ranks=3)


@pytest.mark.parametrize("ranks, extra", [(3, []), (2, ["--pipeline"])], ids=["3-ranks-tensor", "2-ranks-pipeline"])
def test_smollm2_across_ranks_writes_what_one_process_writes(smollm2_path, ranks, extra):
    """The real SmolLM2-135M (30 layers, 9 heads, 3 key/value heads) split over 3 ranks by heads, or over
    2 by layers (which heads cannot be): the same greedy text as one process."""
    mlxllm = Path(sys.executable).parent / "mlxllm"
    args = ["generate", "-m", str(smollm2_path), "-p", "The capital of France is", "-n", "16", "--temp", "0"]
    alone = subprocess.run([str(mlxllm), *args], capture_output=True, text=True, timeout=200)
    launcher = Path(sys.executable).parent / "mlx.launch"
    split = subprocess.run([str(launcher), "--backend", "ring", "-n", str(ranks), "--", str(mlxllm), *args, *extra],
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0 and alone.stdout.strip()
    assert split.stdout.strip() == alone.stdout.strip(), split.stderr[-1000:]
