"""Distillation: the sparse KL against the exact one, the loss mix, the teacher cache (reuse, keys,
corruption rebuilt), students (pruned, quantized, from a config, with a feature projection), and
``mlxllm distill`` end to end on a tiny teacher: the student moves toward the teacher, checkpoints
resume exactly, the output folder is a loadable model, and bad input is one clear line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxllm.formats.save import save_model
from mlxllm.errors import UserError
from mlxllm.formats.loader import load
from mlxllm.train import distill as D
from mlxllm.train import teacher as T
from mlxllm.train import students as S
from mlxllm.train.data import Dataset, Example
from mlxllm.train.loop import token_loss
from test_benchmark import _write_tokenizer
from test_cli import assert_one_line_error, run
from test_load_hf import CONFIG, random_model

TEACHER_CONFIG = {**CONFIG, "vocab_size": 260, "num_hidden_layers": 4, "max_position_embeddings": 512, "head_dim": 32}
WORDS = "the cat sat on a mat while dogs ran past quietly and birds sang over green hills".split()


def _peaky_teacher():
    """Random weights with a head scaled up, so the teacher's distributions have clear winners."""
    model = random_model(TEACHER_CONFIG, mx.float32)
    model.update({"lm_head": {"weight": model.lm_head.weight * 6}})
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = save_model(_peaky_teacher(), tmp_path_factory.mktemp("distill") / "teacher")
    _write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("distill-data")
    for split, n in (("train", 48), ("valid", 8), ("test", 8)):
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))} for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sparse_kl_is_exact_with_the_whole_vocabulary_and_buckets_the_tail():
    rng = np.random.default_rng(0)
    t, s = _log_softmax(rng.normal(size=(3, 5, 20)) * 2), _log_softmax(rng.normal(size=(3, 5, 20)))
    exact = (np.exp(t) * (t - s)).sum(-1)
    ids = np.broadcast_to(np.arange(20), t.shape)
    got = D.sparse_kl(mx.array(ids), mx.array(t, dtype=mx.float32), mx.array(s, dtype=mx.float32))
    np.testing.assert_allclose(np.array(got), exact, rtol=1e-4, atol=1e-5)
    # top-4: KL between the two distributions over (the teacher's 4 tokens, everything else)
    top = np.argsort(-t, axis=-1)[..., :4]
    pt, ps = np.take_along_axis(t, top, -1), np.take_along_axis(s, top, -1)
    p_tail, q_tail = 1 - np.exp(pt).sum(-1), 1 - np.exp(ps).sum(-1)
    want = (np.exp(pt) * (pt - ps)).sum(-1) + p_tail * (np.log(p_tail) - np.log(q_tail))
    got = D.sparse_kl(mx.array(top), mx.array(pt, dtype=mx.float32), mx.array(s, dtype=mx.float32))
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-5)
    assert (want >= 0).all() and (want <= exact + 1e-6).all()  # bucketing loses information, never adds it


def test_loss_mix():
    """alpha = 1 is the data cross-entropy; alpha = 0 is T^2 times the KL; a student equal to the
    teacher has zero KL at any temperature."""
    teacher = _peaky_teacher()
    student = D.Distilled(S.prune_layers(_peaky_teacher(), [0, 3]), None)
    tokens = mx.array([[5, 9, 30, 41, 7, 99, 100, 3]])
    scored = mx.array([[False] + [True] * 7])
    lps = teacher(tokens[:, :-1]) / 2.0
    lps = lps - mx.logsumexp(lps, axis=-1, keepdims=True)
    ids = mx.broadcast_to(mx.arange(260), lps.shape)
    ce, _ = token_loss(student.student, tokens, scored)
    assert mx.allclose(D.distill_loss(2.0, 1.0)(student, tokens, scored, ids, lps)[0], ce, atol=1e-5).item()
    soft = student.student(tokens[:, :-1]) / 2.0
    kl = D.sparse_kl(ids, lps, soft - mx.logsumexp(soft, axis=-1, keepdims=True)).mean()
    assert mx.allclose(D.distill_loss(2.0, 0.0)(student, tokens, scored, ids, lps)[0], 4.0 * kl, atol=1e-4).item()
    same = D.Distilled(teacher, None)
    assert D.distill_loss(2.0, 0.0)(same, tokens, scored, ids, lps)[0].item() == pytest.approx(0.0, abs=1e-5)


def _dataset(n=6, seed=0):
    rng = random.Random(seed)
    return Dataset("train", [Example([rng.randrange(256) for _ in range(rng.randint(3, 12))], [False] + [True] * 11)
                             for _ in range(n)])


def test_teacher_cache_reuse_keys_and_corruption(tmp_path):
    teacher = _peaky_teacher()
    data = _dataset()
    warnings = []
    key = T.cache_key("t", "fp", data, 8, 2.0, True)
    assert key != T.cache_key("t", "fp", data, 16, 2.0, True) != T.cache_key("t", "fp", data, 8, 1.0, True)
    assert key != T.cache_key("t", "fp", _dataset(seed=1), 8, 2.0, True) != T.cache_key("t2", "fp", data, 8, 2.0, True)
    built, cached = T.teacher_targets(teacher, data, tmp_path, key, 8, 2.0, True, lambda *a: None, warnings.append)
    assert not cached and not warnings
    # the stored targets are the teacher's top 8 at T = 2, hidden states its final normed ones
    e = data.examples[2]
    x = mx.array([e.tokens[:-1]])
    lps = teacher(x)[0] / 2.0
    lps = np.array(lps - mx.logsumexp(lps, axis=-1, keepdims=True))
    ids, got, hid = built.batch([2], len(e.tokens))
    n = len(e.tokens) - 1
    assert ids.shape == (1, n, 8)
    for pos in range(n):
        assert set(ids[0, pos]) == set(np.argsort(-lps[pos])[:8])
        np.testing.assert_allclose(got[0, pos], lps[pos, ids[0, pos]], atol=1e-5)
    np.testing.assert_allclose(hid[0], np.array(teacher.hidden(x)[0]), atol=2e-2)
    _, cached = T.teacher_targets(teacher, data, tmp_path, key, 8, 2.0, True, lambda *a: None, warnings.append)
    assert cached and not warnings
    # a flipped byte in the log-probabilities: detected, reported, rebuilt (never used)
    path = tmp_path / key / "logprobs.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    rebuilt, cached = T.teacher_targets(teacher, data, tmp_path, key, 8, 2.0, True, lambda *a: None, warnings.append)
    assert not cached and len(warnings) == 1 and "corrupt" in warnings[0] and "logprobs.npy" in warnings[0]
    np.testing.assert_array_equal(rebuilt.batch([2], len(e.tokens))[1], got)
    (tmp_path / key / "manifest.json").unlink()
    _, cached = T.teacher_targets(teacher, data, tmp_path, key, 8, 2.0, True, lambda *a: None, warnings.append)
    assert not cached and "manifest.json is missing" in warnings[-1]


def test_pruning_specs_and_pruned_forward():
    assert S.pruned_layers("every-2nd-layer", 30) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29]
    assert S.pruned_layers("every-3rd-layer", 7) == [0, 3, 6]
    assert S.pruned_layers("layers=4,0,2", 6) == [0, 2, 4]
    for bad in ("every-1st-layer", "layers=0,9", "layers=1,1", "layers=a", "half"):
        with pytest.raises(UserError):
            S.pruned_layers(bad, 6)
    teacher = _peaky_teacher()
    student = S.prune_layers(_peaky_teacher(), [0, 2])
    assert student.config.num_hidden_layers == 2 and len(student.make_cache()) == 2
    x = mx.array([[1, 2, 3, 4, 5]])
    h = teacher.embed(x)
    for i in (0, 2):
        h = teacher.layers[i](h, "causal", None)
    assert mx.allclose(student(x), teacher.head(teacher.model.norm(h)), atol=1e-4).item()
    # layer kinds move with their blocks
    sliding = random_model({**TEACHER_CONFIG, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                            "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert S.prune_layers(sliding, [1, 2]).config.layer_types == ["full_attention", "sliding_attention"]


def test_quantized_student_trains_only_scales_and_biases():
    student = S.quantized_student(_peaky_teacher(), 4, 32)
    names = [k for k, _ in tree_flatten(student.trainable_parameters())]
    assert names and all(k.endswith((".scales", ".biases")) for k in names)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in student.named_modules())


def _distill(args, capsys, monkeypatch):
    code, out, err = run(["distill", *args], capsys, monkeypatch)
    return code, out, err


def _base(teacher_dir, data_dir, tmp_path, out="student"):
    return ["--teacher", str(teacher_dir), "--data", str(data_dir), "--out", str(tmp_path / out),
            "--teacher-cache", str(tmp_path / "cache"), "--batch-size", "4", "--learning-rate", "2e-3",
            "--alpha", "0", "--temperature", "1", "--top-k", "32", "--steps-per-eval", "10", "--json"]


def test_distill_moves_student_toward_teacher_and_resumes_exactly(teacher_dir, data_dir, tmp_path, capsys, monkeypatch):
    args = _base(teacher_dir, data_dir, tmp_path) + ["--student-init", "prune:layers=0,3", "--iters", "40", "--eval"]
    code, out, err = _distill(args, capsys, monkeypatch)
    assert code == 0, err
    r = json.loads(out)
    before, after = r["before"], r["after"]
    assert after["kl"] < 0.6 * before["kl"]
    assert after["top1_agreement"] > before["top1_agreement"]
    assert r["student_layers"] == 2 and r["steps"] == 40 and not r["teacher_cache"]["reused"]
    vals = [x["val_loss"] for x in r["reports"] if "val_loss" in x]
    assert vals[-1] < vals[0]
    model, tok = load(tmp_path / "student")
    assert model.config.num_hidden_layers == 2 and (tmp_path / "student" / "checkpoint" / D.WEIGHTS).is_file()
    # --eval alone on the saved student reproduces the figures
    code, out, err = _distill(["--teacher", str(teacher_dir), "--data", str(data_dir), "--student", str(tmp_path / "student"),
                               "--eval", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["eval"]["kl"] == pytest.approx(after["kl"], rel=1e-4)
    # 20 steps, then --resume to 40: the same student as 40 straight (the cache is reused)
    half = _base(teacher_dir, data_dir, tmp_path, "resumed") + ["--student-init", "prune:layers=0,3", "--save-every", "10"]
    assert _distill(half + ["--iters", "20"], capsys, monkeypatch)[0] == 0
    code, out, err = _distill(half + ["--iters", "40", "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["start_step"] == 20 and json.loads(out)["teacher_cache"]["reused"]
    a = dict(tree_flatten(load(tmp_path / "student")[0].parameters()))
    b = dict(tree_flatten(load(tmp_path / "resumed")[0].parameters()))
    assert all(mx.allclose(a[k], b[k], atol=1e-6).item() for k in a)
    # an existing --out is never overwritten by accident
    code, _, err = _distill(half + ["--iters", "5"], capsys, monkeypatch)
    assert_one_line_error(code, err, "exists")


def test_distill_variants(teacher_dir, data_dir, tmp_path, capsys, monkeypatch):
    """A quantized student (DWQ), a config student of another width with the feature loss and a
    projection, LoRA on a pruned student, and sequence-level data written by the teacher."""
    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps({**TEACHER_CONFIG, "hidden_size": 32, "num_hidden_layers": 1, "head_dim": 16}))
    runs = {"quantize:4:32": ["--learning-rate", "1e-5"], f"config:{cfg}": ["--feature-loss", "hidden:mse:0.5"],
            "prune:every-2nd-layer": ["--lora-rank", "4", "--seq-level", "6"]}
    for i, (init, extra) in enumerate(runs.items()):
        args = _base(teacher_dir, data_dir, tmp_path, f"s{i}") + ["--student-init", init, "--iters", "12", *extra]
        code, out, err = _distill(args, capsys, monkeypatch)
        assert code == 0, (init, err)
        r = json.loads(out)
        vals = [x["val_loss"] for x in r["reports"] if "val_loss" in x]
        assert vals[-1] < vals[0], init
        model, _ = load(tmp_path / f"s{i}")
        assert not any("lora" in k or "proj." == k[:5] for k, _ in tree_flatten(model.parameters()))
        if init.startswith("quantize"):
            assert (tmp_path / f"s{i}" / "config.json").read_text().count('"bits": 4')
        if "--seq-level" in extra:
            assert r["teacher_completions"] == 48 and r["train_examples"] == 96
    assert any(p.name.startswith("completions-") for p in (tmp_path / "cache").iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--student-init", "prune:every-2nd-layer", "--temperature", "0"], "--temperature"),
    (["--student-init", "prune:every-2nd-layer", "--top-k", "999"], "--top-k must be in 1..260"),
    (["--student-init", "prune:every-2nd-layer", "--alpha", "1.5"], "--alpha"),
    (["--student-init", "shrink"], "--student-init takes"),
    (["--student-init", "prune:layers=7"], "layer indices"),
    ([], "either --student or --student-init"),
    (["--student-init", "prune:every-2nd-layer", "--feature-loss", "logits:kl"], "--feature-loss"),
])
def test_distill_bad_input(teacher_dir, data_dir, tmp_path, capsys, monkeypatch, extra, message):
    code, _, err = _distill(_base(teacher_dir, data_dir, tmp_path) + extra, capsys, monkeypatch)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "student").exists()


def test_distill_refuses_another_tokenizer_and_missing_data(teacher_dir, data_dir, tmp_path, capsys, monkeypatch):
    tk = pytest.importorskip("tokenizers")
    from mlxllm.tokenize import bpe

    other = tmp_path / "other"
    save_model(random_model(TEACHER_CONFIG, mx.float32), other)
    vocab = {c: i for i, c in enumerate(bpe.BYTE_CHARS)}
    vocab["th"] = 256
    ref = tk.Tokenizer(tk.models.BPE(vocab, [("t", "h")]))
    ref.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.save(str(other / "tokenizer.json"))
    code, _, err = _distill(_base(teacher_dir, data_dir, tmp_path) + ["--student", str(other)], capsys, monkeypatch)
    assert_one_line_error(code, err, "different tokenizers")
    args = _base(teacher_dir, tmp_path / "nothing", tmp_path) + ["--student-init", "prune:every-2nd-layer"]
    assert_one_line_error(*_distill(args, capsys, monkeypatch)[::2], "no such folder or file")
