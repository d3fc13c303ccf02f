"""LoRA / DoRA adapters: their math, fusing, adapter interop with mlx-lm, fine-tuning data, the training
loop (loss falls, checkpoints, exact resume, Ctrl-C), and the lora / fuse / --adapter-path command line
with its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.errors import UserError
from mlxllm.formats.loader import load, load_model
from mlxllm.model import adapters as A
from mlxllm.train import data as D
from mlxllm.train.loop import STATE_INFO, TrainConfig, Trainer
from test_benchmark import tiny_dir  # noqa: F401  (fixture: a random llama + byte-level tokenizer on disk)
from test_cli import assert_one_line_error, run
from test_load_hf import CONFIG, random_model

TOKENS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]])


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Nonzero B (and A, m) so that an adapter changes the output."""
    mx.random.seed(seed)
    params = A.adapter_parameters(model)
    model.update(tree_unflatten([(k, v + mx.random.normal(v.shape) * 0.05) for k, v in params.items()]))


def _adapted(dora: bool = False, quantized: bool = False, layers: int = 2):
    model = random_model(CONFIG, mx.float32)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    keys = A.target_keys(model, list(A.TARGETS), layers)
    A.apply_adapters(model, layers, keys, 4, 2.0, dora=dora)
    return model, keys


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_is_identity_and_fuse_is_exact(dora, quantized):
    """B = 0: the adapted model is the base. With trained-like adapters, fusing (dequantized) gives the
    same logits; re-quantized it stays close."""
    base = random_model(CONFIG, mx.float32)
    if quantized:
        nn.quantize(base, group_size=32, bits=4)
    want = base(TOKENS)
    model, _ = _adapted(dora, quantized)
    assert mx.allclose(model(TOKENS), want, atol=1e-5).item()
    trainable = A.adapter_parameters(model)
    assert trainable and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") for k in trainable)
    _randomize_adapters(model)
    adapted = model(TOKENS)
    assert not mx.allclose(adapted, want, atol=1e-2).item()
    A.fuse(model, dequantize=True)
    assert not any(isinstance(m, A.LoRALinear) for _, m in model.named_modules())
    assert mx.allclose(model(TOKENS), adapted, atol=1e-4).item()
    if quantized:  # re-quantized with the base's own bits and groups: the float fusion, quantized
        model2, _ = _adapted(dora, quantized)
        _randomize_adapters(model2)
        layer = model2.layers[0].self_attn.q_proj
        q, w = layer.fused(), layer.fused(dequantize=True).weight
        assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)
        assert all(mx.array_equal(a, b).item() for a, b in zip((q.weight, q.scales, q.biases), mx.quantize(w, 32, 4)))


def test_lora_layer_formula():
    base = nn.Linear(64, 32)
    layer = A.LoRALinear(base, 4, 0.5)
    layer.lora_b = mx.random.normal((4, 32))
    x = mx.random.normal((2, 3, 64))
    want = x @ base.weight.T + base.bias + 0.5 * (x @ layer.lora_a) @ layer.lora_b
    assert mx.allclose(layer(x), want, atol=1e-5).item()


mlx_lm_tuner = pytest.importorskip("mlx_lm.tuner.utils")


def _mlx_lm_pair(quantized: bool):
    from test_parity_mlx_lm import _random_pair

    ours, ref = _random_pair(dict(CONFIG))
    if quantized:
        nn.quantize(ours, group_size=32, bits=4)
        nn.quantize(ref, group_size=32, bits=4)
    return ours, ref


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_our_adapters_load_in_mlx_lm(tmp_path, dora, quantized):
    ours, ref = _mlx_lm_pair(quantized)
    keys = A.target_keys(ours, ["q", "v", "down"], 1)
    A.apply_adapters(ours, 1, keys, 4, 2.0, dora=dora)
    _randomize_adapters(ours)
    A.save_adapters(ours, tmp_path, A.adapter_config(1, keys, 4, 2.0, 0.0, dora))
    mlx_lm_tuner.load_adapters(ref, str(tmp_path))
    assert mx.allclose(ours(TOKENS), ref(TOKENS), atol=1e-4).item()


@pytest.mark.parametrize("with_keys", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_mlx_lm_adapters_load_in_mlxllm(tmp_path, dora, with_keys):
    """An adapter folder as ``mlx_lm.lora`` writes it (its config has keys only when the user gave them)."""
    ours, ref = _mlx_lm_pair(quantized=False)
    ref.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0}
    if with_keys:
        params["keys"] = ["self_attn.k_proj", "mlp.up_proj"]
    mlx_lm_tuner.linear_to_lora_layers(ref, 2, params, use_dora=dora)
    mx.random.seed(2)
    trainable = dict(tree_flatten(ref.trainable_parameters()))
    ref.update(tree_unflatten([(k, v + mx.random.normal(v.shape) * 0.05) for k, v in trainable.items()]))
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), dict(tree_flatten(ref.trainable_parameters())))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora" if dora else "lora", "num_layers": 2, "lora_parameters": params, "iters": 10}))
    A.load_adapters(ours, tmp_path)
    ours.eval()
    ref.eval()
    assert mx.allclose(ours(TOKENS), ref(TOKENS), atol=1e-4).item()


# --- data -------------------------------------------------------------------------------------------


def _write(folder: Path, split: str, rows: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_path):
    from mlxllm.tokenize import Tokenizer

    return Tokenizer.from_gguf(smollm2_path)


def test_chat_and_completion_masks(tmp_path, smol_tokenizer):
    """Chat data scores exactly the assistant turns (through the end-of-turn token) by default;
    prompt/completion pairs go through the chat template and, with mask_prompt, score the completion;
    unmasked, everything after the first token is scored."""
    tok = smol_tokenizer
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]
    _write(tmp_path, "train", [{"messages": msgs}])
    ex = D.load_split(tmp_path, "train", tok, 512).examples[0]
    scored_text = tok.decode([t for t, s in zip(ex.tokens, ex.scored) if s])
    assert scored_text == "Hello there<|im_end|>\nSee you<|im_end|>\n", scored_text
    _write(tmp_path, "valid", [{"prompt": "2+2=", "completion": "4"}])
    ex = D.load_split(tmp_path, "valid", tok, 512, mask_prompt=True).examples[0]
    assert tok.decode([t for t, s in zip(ex.tokens, ex.scored) if s]) == "4<|im_end|>\n"
    ex = D.load_split(tmp_path, "valid", tok, 512).examples[0]
    assert ex.scored == [False] + [True] * (len(ex.tokens) - 1)


def test_text_examples_truncation_and_batches(tmp_path, smol_tokenizer):
    _write(tmp_path, "train", [{"text": "word " * n} for n in (3, 50, 7, 9, 200, 4)])
    ds = D.load_split(tmp_path, "train", smol_tokenizer, 64)
    assert ds.truncated == 1 and max(len(e.tokens) for e in ds.examples) == 64
    it = D.batches(ds, 2, seed=0, pad_id=0, multiple=16)
    first = [next(it) for _ in range(3)]
    assert all(t.shape[1] % 16 == 0 and t.shape == s.shape for t, s, _ in first)
    lengths = sorted(len(e.tokens) for e in ds.examples)
    assert sorted(int(n.max()) for _, _, n in first) == sorted(max(lengths[i:i + 2]) for i in (0, 2, 4))
    assert all(int(s.sum(1).max()) + 1 == int(n.max()) for _, s, n in first)  # text: every token after the first
    again = [next(D.batches(ds, 2, seed=0, pad_id=0, multiple=16)) for _ in range(1)]
    assert np.array_equal(again[0][0], first[0][0])  # the same seed, the same order


@pytest.mark.parametrize("line, message", [
    ("{not json", "train.jsonl:2: not valid JSON"),
    ("[1, 2]", "train.jsonl:2: expected a JSON object"),
    ('{"question": "x"}', 'train.jsonl:2: expected "text"'),
    ('{"prompt": "x", "completion": "y"}', "train.jsonl:2: a completion record in a file of text records"),
    ('{"text": 3}', 'train.jsonl:2: "text" must be a string'),
])
def test_malformed_lines_name_file_and_line(tmp_path, smol_tokenizer, line, message):
    _write(tmp_path, "train", [{"text": "fine"}, line])
    with pytest.raises(UserError, match=message):
        D.load_split(tmp_path, "train", smol_tokenizer, 64)


def test_chat_without_assistant_and_empty_files(tmp_path, smol_tokenizer):
    _write(tmp_path, "train", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(UserError, match="train.jsonl:1: no assistant message"):
        D.load_split(tmp_path, "train", smol_tokenizer, 64)
    _write(tmp_path, "valid", ["", "  "])
    with pytest.raises(UserError, match="valid.jsonl has no examples"):
        D.load_split(tmp_path, "valid", smol_tokenizer, 64)


# --- the training loop ---------------------------------------------------------------------------------


def _pattern_data(n: int = 48, seed: int = 0) -> D.Dataset:
    """Repeated random 6-token motifs: learnable in context, so the loss must fall."""
    rng = np.random.default_rng(seed)
    exs = [D.Example(list(int(t) for t in rng.integers(3, 90, 6)) * 3, [False] * 6 + [True] * 12) for _ in range(n)]
    return D.Dataset("train", exs)


def _trainer(iters: int, **kw) -> tuple[nn.Module, Trainer]:
    model, _ = _adapted(layers=2)
    cfg = TrainConfig(iters=iters, batch_size=4, learning_rate=5e-3, steps_per_report=5, steps_per_eval=5, save_every=3,
                      **kw)
    return model, Trainer(model, cfg)


def test_loss_decreases_with_accumulation_and_cosine():
    model, trainer = _trainer(40, grad_accumulation=2, lr_schedule="cosine", warmup=4)
    data = _pattern_data()
    val = D.eval_batches(data, 8, 3)
    reports = trainer.run(D.batches(data, 4, 0), val, lambda: None)
    vals = [r["val_loss"] for r in reports if "val_loss" in r]
    assert vals[-1] < 0.9 * vals[0] and vals == sorted(vals, reverse=True), vals
    assert reports[-1]["learning_rate"] < 1e-4  # cosine to zero


def test_resume_continues_exactly_and_ctrl_c_saves(tmp_path):
    """6 steps at once equal 3 steps, a checkpoint, and 3 more in a new trainer (optimizer and random
    state restored, used batches skipped); Ctrl-C saves the step it reached."""
    data = _pattern_data()
    straight, t1 = _trainer(6, seed=3)
    t1.run(D.batches(data, 4, 3), None, lambda: None)
    half, t2 = _trainer(3, seed=3)
    folder = tmp_path / "ck"
    t2.run(D.batches(data, 4, 3), None, lambda: (A.save_adapters(half, folder, {}), t2.save(folder)))
    resumed, t3 = _trainer(6, seed=99)
    resumed.load_weights(str(folder / A.ADAPTER_FILE), strict=False)
    assert t3.restore(folder) and t3.step == 3
    t3.cfg.seed = 3  # the data order is the run's, given with its command line
    t3.run(D.batches(data, 4, 3), None, lambda: None)
    for k, v in A.adapter_parameters(straight).items():
        np.testing.assert_allclose(np.array(A.adapter_parameters(resumed)[k]), np.array(v), atol=1e-6, err_msg=k)

    model, t4 = _trainer(10)
    saved = []

    def interrupt(r):
        if r["step"] >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        t4.run(D.batches(data, 4, 0), None, lambda: saved.append(t4.step), interrupt)
    assert saved[-1] == 5


# --- command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Completions the tiny byte-level model can learn: a fixed answer format."""
    folder = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i % 7}!"} for i in range(40)]
    _write(folder, "train", rows[:32])
    _write(folder, "valid", rows[32:36])
    _write(folder, "test", rows[36:])
    return folder


def test_cli_train_test_generate_fuse(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "ad"
    args = ["lora", "-m", str(tiny_dir), "--data", str(data_dir), "--adapter-path", str(out), "--iters", "12",
            "--batch-size", "4", "--learning-rate", "5e-3", "--lora-rank", "4", "--lora-layers", "all",
            "--steps-per-eval", "6", "--save-every", "5", "--mask-prompt", "--json"]
    code, stdout, _ = run([*args, "--train", "--test"], capsys, monkeypatch)
    assert code in (0, None)
    result = json.loads(stdout)
    vals = [r["val_loss"] for r in result["reports"] if "val_loss" in r]
    assert result["steps"] == 12 and vals[-1] < vals[0] and np.isfinite(result["test_loss"])
    assert json.loads((out / STATE_INFO).read_text())["step"] == 12
    config = json.loads((out / A.CONFIG_FILE).read_text())
    assert config["lora_parameters"]["rank"] == 4 and config["lora_parameters"]["scale"] == 4.0
    # --test alone reads the saved adapters and reproduces the loss
    code, stdout, _ = run(["lora", "-m", str(tiny_dir), "--data", str(data_dir), "--adapter-path", str(out), "--test",
                           "--mask-prompt", "--json"], capsys, monkeypatch)
    assert abs(json.loads(stdout)["test_loss"] - result["test_loss"]) < 1e-4
    # generation through the adapters, and the fused model computing the same logits
    code, stdout, _ = run(["generate", "-m", str(tiny_dir), "--adapter-path", str(out), "-p", "Q3:", "-n", "4",
                           "--json"], capsys, monkeypatch)
    assert code in (0, None) and "text" in json.loads(stdout)
    fused = tmp_path / "fused"
    code, _, err = run(["fuse", "-m", str(tiny_dir), "--adapter-path", str(out), "--out", str(fused)], capsys, monkeypatch)
    assert code in (0, None), err
    adapted, _ = load(str(tiny_dir), adapter_path=out)
    tokens = mx.array([[81, 50, 58, 32, 65]])
    assert mx.allclose(load_model(fused)(tokens), adapted(tokens), atol=1e-4).item()


def test_cli_resume_matches_and_bad_input_keeps_saved(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    common = ["lora", "-m", str(tiny_dir), "--data", str(data_dir), "--batch-size", "4", "--learning-rate", "5e-3",
              "--lora-rank", "4", "--lora-layers", "1", "--lora-targets", "q,v", "--train", "--json",
              "--steps-per-eval", "100"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run([*common, "--adapter-path", str(full), "--iters", "6"], capsys, monkeypatch)[0] in (0, None)
    assert run([*common, "--adapter-path", str(part), "--iters", "3"], capsys, monkeypatch)[0] in (0, None)
    code, stdout, _ = run([*common, "--adapter-path", str(part), "--iters", "6", "--resume-adapter-file",
                           str(part / A.ADAPTER_FILE)], capsys, monkeypatch)
    assert json.loads(stdout)["start_step"] == 3
    a, b = mx.load(str(full / A.ADAPTER_FILE)), mx.load(str(part / A.ADAPTER_FILE))
    assert all(mx.allclose(a[k], b[k], atol=1e-6).item() for k in a)

    before = (part / A.ADAPTER_FILE).read_bytes()
    bad_data = tmp_path / "bad"
    _write(bad_data, "train", [{"text": "ok"}, "{oops"])
    _write(bad_data, "valid", [{"text": "ok"}])
    empty = tmp_path / "empty"
    _write(empty, "train", [{"text": "a b c"}] * 8)
    _write(empty, "valid", [""])
    cases = [
        (["--data", str(tmp_path / "nowhere")], "is not a folder"),
        (["--data", str(bad_data)], "train.jsonl:2: not valid JSON"),
        (["--data", str(empty)], "valid.jsonl has no examples"),
        (["--lora-rank", "0"], "--lora-rank must be positive"),
        (["--lora-layers", "0"], "--lora-layers must be positive"),
        (["--lora-targets", "gate_up"], "--lora-targets: unknown gate_up"),
        (["--lora-rank", "8", "--resume-adapter-file", str(part / A.ADAPTER_FILE)], "does not fit these adapters"),
    ]
    for extra, message in cases:  # --force: bad input is refused before the saved adapters are replaced
        code, _, err = run([*common, "--adapter-path", str(part), "--iters", "6", "--force", *extra], capsys, monkeypatch)
        assert_one_line_error(code, err, message)
        assert (part / A.ADAPTER_FILE).read_bytes() == before
    # a fresh run into a folder that already holds adapters needs --resume-adapter-file or --force
    code, _, err = run([*common, "--adapter-path", str(part), "--iters", "2"], capsys, monkeypatch)
    assert_one_line_error(code, err, "already holds adapters")
    assert (part / A.ADAPTER_FILE).read_bytes() == before
    # a save interrupted between the adapters and the training state: resume refuses the mismatched pair
    saved, meta = mx.load(str(part / A.ADAPTER_FILE), return_metadata=True)
    assert meta["mlxllm_step"] == "6"
    mx.save_safetensors(str(part / A.ADAPTER_FILE), saved, metadata={**meta, "mlxllm_step": "7"})
    code, _, err = run([*common, "--adapter-path", str(part), "--iters", "9", "--resume-adapter-file",
                        str(part / A.ADAPTER_FILE)], capsys, monkeypatch)
    assert_one_line_error(code, err, "saved at step 7 but the training state at step 6")
    mx.save_safetensors(str(part / A.ADAPTER_FILE), saved, metadata=meta)
    before = (part / A.ADAPTER_FILE).read_bytes()
    (part / A.CONFIG_FILE).write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                  "lora_parameters": {"rank": 16, "scale": 1.0, "dropout": 0.0,
                                                                      "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}))
    code, _, err = run(["generate", "-m", str(tiny_dir), "--adapter-path", str(part), "-p", "x"], capsys, monkeypatch)
    assert_one_line_error(code, err, "does not fit this model")


def test_targets_naming_no_layer():
    model = random_model(CONFIG, mx.float32)
    with pytest.raises(UserError, match="selects no linear layer"):
        A.target_keys(model, [], 2)


def test_non_finite_settings_and_loss_save_nothing(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A NaN learning rate is refused; a loss that becomes non-finite stops training without saving."""
    common = ["lora", "-m", str(tiny_dir), "--data", str(data_dir), "--batch-size", "4", "--lora-rank", "4",
              "--lora-layers", "1", "--train", "--json", "--steps-per-eval", "100", "--save-every", "1"]
    for value in ("nan", "inf"):
        code, _, err = run([*common, "--adapter-path", str(tmp_path / value), "--iters", "2", "--learning-rate", value],
                           capsys, monkeypatch)
        assert_one_line_error(code, err, "--learning-rate must be a finite number")
        assert not (tmp_path / value).exists()
    out = tmp_path / "blowup"
    code, _, err = run([*common, "--adapter-path", str(out), "--iters", "6", "--learning-rate", "1e30",
                        "--max-grad-norm", "0"], capsys, monkeypatch)
    assert code not in (0, None) and "Traceback" not in err  # the reports before it are on stderr too
    assert err.strip().splitlines()[-1].startswith("error: the training loss became")
    saved = mx.load(str(out / A.ADAPTER_FILE)) if (out / A.ADAPTER_FILE).exists() else {}
    assert all(mx.isfinite(v).all().item() for v in saved.values())  # only good checkpoints were written


@pytest.mark.parametrize("family", ["phi3", "ministral3", "mistral4", "gpt_oss", "glm4_moe", "llama4", "qwen3_5",
                                    "mixtral", "deepseek_v3"])
def test_lora_trains_and_fuses_across_families(family):
    """Every target kind finds its maps (Phi-3's fused qkv_proj / gate_up_proj included), the loss falls
    over a few steps (MoE layers too: routing indices carry no gradient, and on the CPU the step runs
    uncompiled because experts are grouped on the host), and the fused model gives the adapted logits."""
    pytest.importorskip("mlx_lm")
    from test_parity_mlx_lm import FAMILIES

    config = FAMILIES[family]
    model = random_model(config.get("text_config", config), mx.float32)
    keys = A.target_keys(model, list(A.TARGETS), 2)
    if family == "phi3":
        assert {k.rsplit(".", 1)[-1] for k in keys} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    A.apply_adapters(model, 2, keys, 4, 2.0)
    trainer = Trainer(model, TrainConfig(iters=12, batch_size=4, learning_rate=1e-2, steps_per_report=4,
                                         steps_per_eval=6, save_every=100))
    data = _pattern_data(16)
    reports = trainer.run(D.batches(data, 4, 0), D.eval_batches(data, 8, 2), lambda: None)
    losses = [r["val_loss"] for r in reports if "val_loss" in r]
    assert losses[-1] < losses[0], losses
    adapted = model(TOKENS)
    A.fuse(model, dequantize=True)
    assert mx.allclose(model(TOKENS), adapted, atol=1e-4).item()


def test_gemma4_trains_converts_and_benches(data_dir, tmp_path, capsys, monkeypatch):
    """Gemma 4 with KV-sharing layers and per-layer inputs: gradients through the shared keys and values
    are the same with blocks recomputed (--grad-checkpoint), ``lora`` trains it, ``convert -q`` writes a
    4-bit directory mlx-lm computes the same logits from, and ``bench`` runs it."""
    from click.testing import CliRunner

    from mlxllm.cli import cli
    from mlxllm.formats.save import save_model
    from mlxllm.train.loop import checkpointed_blocks
    from test_benchmark import _write_tokenizer
    from test_parity_mlx_lm import FAMILIES

    config = dict(FAMILIES["gemma4"], vocab_size=260, vocab_size_per_layer_input=260, hidden_size_per_layer_input=32,
                  max_position_embeddings=200)
    model = random_model(config, mx.float32)

    def loss(params):
        model.update(params)
        return nn.losses.cross_entropy(model(TOKENS[:, :-1]), TOKENS[:, 1:]).mean()

    params = model.trainable_parameters()
    plain = dict(tree_flatten(mx.grad(loss)(params)))
    with checkpointed_blocks(model):
        recomputed = dict(tree_flatten(mx.grad(loss)(params)))
    k_proj = "model.layers.2.self_attn.k_proj.weight"  # the source of layer 5's keys and values
    assert mx.abs(plain[k_proj]).max().item() > 0
    assert all(mx.allclose(plain[k], recomputed[k], atol=1e-6).item() for k in plain)

    src = save_model(model, tmp_path / "src")
    _write_tokenizer(src)
    code, stdout, _ = run(["lora", "-m", str(src), "--data", str(data_dir), "--adapter-path", str(tmp_path / "ad"),
                           "--iters", "4", "--batch-size", "2", "--lora-rank", "4", "--lora-layers", "all",
                           "--grad-checkpoint", "--steps-per-eval", "100", "--train", "--json"], capsys, monkeypatch)
    assert code in (0, None) and json.loads(stdout)["steps"] == 4
    out = tmp_path / "q4"
    code, _, err = run(["convert", "-m", str(src), "-o", str(out), "-q", "--q-bits", "4", "--q-group-size", "32"],
                       capsys, monkeypatch)
    assert code in (0, None), err
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    theirs, _ = mlx_lm_utils.load_model(out)
    assert mx.allclose(load_model(out, compute="native")(TOKENS), theirs(TOKENS), atol=1e-3).item()
    res = CliRunner().invoke(cli, ["bench", "-m", str(src), "-p", "16", "-g", "4", "-n", "1",
                                   "--json", str(tmp_path / "b.json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
