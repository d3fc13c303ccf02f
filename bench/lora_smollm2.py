"""Real LoRA fine-tunes of the bundled SmolLM2-135M-Instruct on this CPU (they take minutes):

* ``--task extract``: a skill the base model lacks. Sentences about made-up people (name, age, city,
  job, in six phrasings) must be answered with one record in a fixed format,
  ``name=...; age=...; city=...; job=...``. Train and validation pairs are generated here (seeded);
  the held-out prompts use names the training data never shows. Reports validation loss before and
  after, and exact-match accuracy of greedy answers on the held-out prompts for the base model and
  the adapted one (also on two phrasings never trained on).
* ``--task pydoc``: domain adaptation on Python's own documentation (``pydoc_data.topics``): training
  on most topics, perplexity on held-out topics before and after.

    python bench/lora_smollm2.py --task extract --out bench/results/lora_extract.json
    python bench/lora_smollm2.py --task pydoc --out bench/results/lora_pydoc.json

Time, tokens/s and peak memory come from the training loop's own reports.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import tempfile
import time
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx

from mlxllm.tools import perplexity as pp
from mlxllm import stream_generate
from mlxllm.files import write_atomic
from mlxllm.formats.loader import load
from mlxllm.formats.hub import default_model_path
from mlxllm.train.finetune import LoraOptions, run
from mlxllm.train.loop import TrainConfig

NAMES = """Ava Bram Cleo Dario Edda Fenn Gala Hugo Ines Joss Kira Lior Mara Nils Odile Pavel Quin Rhea Soren Tova
Ugo Vera Wren Xavi Yara Zeno Alba Boris Cyra Dov Elin Faro Gita Hale Iris Jarek Kalle Luz Milo Nadia Oren Pia
Rafe Sabe Taro Una Vito Wilma Yusuf Zora""".split()
HELD_OUT_NAMES = "Anouk Bastian Clio Dmitri Esme Florin Greta Hamid Ilse Jonas Kenji Lotte Mateo Nora".split()
CITIES = """Lyon Porto Ghent Turku Brno Split Graz Bergen Aarhus Malmo Utrecht Lucca Cadiz Kaunas Tartu Bled
Sibiu Pecs Ohrid Varna""".split()
JOBS = """baker tailor pilot nurse farmer potter welder chemist florist sculptor librarian glazier surveyor
cooper jeweller""".split()
PHRASINGS = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as a {job} in {city}.",
    "In {city} lives {name}, a {job} aged {age}.",
    "{name} ({age}) has been a {job} in {city} for years.",
    "The {job} {name} is {age} years old and lives in {city}.",
    "Born {age} years ago, {name} now works as a {job} in {city}.",
]
UNSEEN_PHRASINGS = ["{city} is home to {name}, {age}, a {job} by trade.", "{name}, a {job}, turned {age} last spring in {city}."]
QUESTION = "Extract the person's record from this sentence: "


def _person(rng: random.Random, names: list[str], phrasings: list[str]) -> dict[str, str]:
    p = {"name": rng.choice(names), "age": str(rng.randint(18, 90)), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    return {"prompt": QUESTION + rng.choice(phrasings).format(**p),
            "completion": f"name={p['name']}; age={p['age']}; city={p['city']}; job={p['job']}"}


def extract_data(folder: Path, n_train: int, n_valid: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    splits = {"train": [_person(rng, NAMES, PHRASINGS) for _ in range(n_train)],
              "valid": [_person(rng, NAMES, PHRASINGS) for _ in range(n_valid)],
              "test": [_person(rng, HELD_OUT_NAMES, PHRASINGS) for _ in range(n_test)],
              "unseen": [_person(rng, HELD_OUT_NAMES, UNSEEN_PHRASINGS) for _ in range(n_test // 2)]}
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits[split]))
    return splits


def accuracy(model, tok, rows: list[dict]) -> float:
    right = 0
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        out = "".join(x.text for x in stream_generate(model, tok, text, 40)).strip().split("\n")[0]
        right += out == r["completion"]
    return right / len(rows)


def pydoc_data(folder: Path, tok, chunk_tokens: int, held_out_every: int) -> dict[str, list[str]]:
    """Topics in sorted order; every ``held_out_every``-th topic is held out (test), the one after it
    validation; texts cut into pieces of about ``chunk_tokens`` tokens."""
    from pydoc_data.topics import topics

    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, key in enumerate(sorted(topics)):
        split = "test" if i % held_out_every == 0 else "valid" if i % held_out_every == 1 else "train"
        ids = tok.encode(topics[key], add_special_tokens=False)
        for s in range(0, len(ids), chunk_tokens):
            piece = tok.decode(ids[s : s + chunk_tokens])
            if piece.strip():
                splits[split].append(piece)
    for split, texts in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["extract", "pydoc"], default="extract")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, tok = load(str(default_model_path()), compute="float32")
    result = {"task": args.task, "machine": platform.processor() or platform.machine(), "mlx": mx.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, adapters = Path(tmp) / "data", Path(tmp) / "adapters"
        data_dir.mkdir()
        if args.task == "extract":
            splits = extract_data(data_dir, 400, 50, 60)
            result["base_accuracy"] = accuracy(model, tok, splits["test"])
            print(f"base model: {result['base_accuracy']:.0%} exact answers on held-out prompts", flush=True)
            iters, lr = args.iters or 80, args.learning_rate or 3e-4
            opts = dict(mask_prompt=True, max_seq_length=256)
        else:
            splits = pydoc_data(data_dir, tok, 256, 10)
            test_tokens = tok.encode("\n\n".join(splits["test"]))
            result["test_perplexity_base"] = pp.summarize(pp.token_nll(model, test_tokens, 512))["perplexity"]
            print(f"base model: held-out perplexity {result['test_perplexity_base']:.3f}", flush=True)
            iters, lr = args.iters or 200, args.learning_rate or 1e-4
            opts = dict(max_seq_length=256)
        cfg = TrainConfig(iters=iters, batch_size=args.batch_size, learning_rate=lr, lr_schedule="cosine",
                          warmup=10, steps_per_report=10, steps_per_eval=max(iters // 3, 1), val_batches=-1,
                          save_every=iters)
        lora = LoraOptions(data=data_dir, adapter_path=adapters, train=True, test=True, rank=args.rank,
                           alpha=2.0 * args.rank, layers=args.layers, train_config=cfg, **opts)
        start = time.perf_counter()
        out = run(model, tok, lora, "SmolLM2-135M-Instruct", report=lambda r: print(json.dumps(r), flush=True))
        result["train_seconds"] = time.perf_counter() - start
        reports = out.pop("reports")
        vals = [r["val_loss"] for r in reports if "val_loss" in r]
        trains = [r for r in reports if "train_loss" in r]
        result.update(out, settings={"iters": iters, "batch_size": args.batch_size, "learning_rate": lr,
                                     "rank": args.rank, "layers": args.layers, "schedule": "cosine, 10 warm-up"},
                      val_loss_before=vals[0], val_loss_after=vals[-1],
                      tokens_per_s=sum(r["tokens_per_s"] for r in trains) / len(trains),
                      peak_memory_gb=max(r["peak_memory_gb"] for r in reports), train_tokens=reports[-1]["tokens"],
                      splits={k: len(v) for k, v in splits.items()})
        if args.task == "extract":
            model.eval()
            result["adapted_accuracy"] = accuracy(model, tok, splits["test"])
            result["adapted_accuracy_unseen_phrasings"] = accuracy(model, tok, splits["unseen"])
        else:
            model.eval()
            result["test_perplexity_adapted"] = pp.summarize(pp.token_nll(model, test_tokens, 512))["perplexity"]
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=1))
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2))
    if args.task == "extract":
        print(f"held-out exact answers: base {result['base_accuracy']:.0%} -> adapted {result['adapted_accuracy']:.0%}; "
              f"validation loss {result['val_loss_before']:.3f} -> {result['val_loss_after']:.3f} "
              f"({math.exp(result['val_loss_after'] - result['val_loss_before']):.2f}x in perplexity)")


if __name__ == "__main__":
    main()
