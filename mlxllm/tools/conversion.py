"""``mlxllm convert`` and ``fuse``: a model (GGUF, Hugging Face directory or Hub id) written as an
mlx-community directory, optionally cast, quantized or with adapters fused in.

``bench --compare`` uses the same save to give mlx-lm the very weights mlxllm loaded from a GGUF file.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import UserError
from ..formats.gguf import GGUFSource
from ..formats.weights import KQUANT_CHOICES, REQUANT_GROUP, TensorSpec
from ..gguf_file import GGUFFile
from ..model.quantize import cast_floats, check_quantization, quantize_model, recipe_bits
from ..formats.save import model_card, quantization_block, save_model

def gguf_import_report(specs: list[TensorSpec], kquant: str, quantize: bool, errors: dict[str, float] | None
                       ) -> list[dict[str, Any]]:
    """Per GGUF tensor type: how many tensors, what conversion did with them, and for block types
    MLX cannot hold the relative RMS error re-quantizing them added (``errors``, measured at load)."""
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        row = rows.setdefault(spec.file_type, {"type": spec.file_type, "tensors": 0, "parameters": 0})
        row["tensors"] += 1
        row["parameters"] += spec.elements
        if quantize:
            row["action"] = "dequantized, then quantized as requested"
        elif spec.form == "affine":
            row["action"] = f"kept exactly (MLX {spec.bits}-bit, group {spec.group_size})"
        elif spec.form == "float":
            row["action"] = "kept (16-bit)" if spec.bits == 16 else "cast to 16-bit"
        elif kquant == "float":
            row["action"] = "dequantized to 16-bit float (exact)"
        else:
            row["action"] = f"re-quantized to MLX {kquant[1:]}-bit, group {REQUANT_GROUP}"
            row["added_rms_error"] = (errors or {}).get(spec.file_type, 0.0)
    return list(rows.values())


@contextlib.contextmanager
def tokenizer_files_of(path: Path, header: GGUFFile | None = None) -> Iterator[Path]:
    """A folder with ``path``'s tokenizer as Hugging Face files: the model folder itself, or for a GGUF
    file a temporary one written from its metadata (``mlxllm.tokenize.export``; ``header``: the file
    already parsed)."""
    if not path.is_file():
        yield path
        return
    from ..tokenize import read_gguf_tokenizer_metadata
    from ..tokenize.export import write_hf_tokenizer

    with tempfile.TemporaryDirectory(prefix="mlxllm-tokenizer-") as tok_dir:
        write_hf_tokenizer(read_gguf_tokenizer_metadata(header or path), Path(tok_dir))
        yield Path(tok_dir)


def convert(source: str, out: str | Path, *, quantize: bool = False, bits: int = 4, group_size: int = 64,
            mode: str = "affine", dtype: str | None = None, recipe: str | None = None, requantize: str = "q8",
            force: bool = False, adapter_path: str | Path | None = None, dequantize: bool = False) -> dict[str, Any]:
    """Load ``source`` (HF / mlx-community directory, Hub id or GGUF file), optionally cast and
    quantize it, and write it to ``out`` in the mlx-community layout; returns what was done.

    GGUF: Q4_0/Q4_1/Q8_0 are kept bit for bit; block types MLX lacks are re-quantized per
    ``requantize`` ('q8', 'q4' or 'float'); with ``quantize`` everything is dequantized first. The
    tokenizer is written as Hugging Face files (``mlxllm.tokenize.export``). With ``adapter_path`` the
    adapters are fused into the weights first (``mlxllm fuse``): a quantized layer stays quantized with
    its own bits and groups unless ``dequantize``."""
    from ..formats.hub import resolve
    from ..formats.loader import load_model, open_source

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists: choose another --out or pass --force to replace it")
    if quantize:
        check_quantization(bits, group_size, mode)
        recipe_bits(recipe, bits)  # reject an unknown recipe before any loading
    elif recipe:
        raise UserError("--recipe needs --quantize")
    if requantize not in KQUANT_CHOICES:
        raise UserError(f"--requantize takes {', '.join(KQUANT_CHOICES)}, not '{requantize}'")
    path = resolve(source)
    opened = open_source(path)  # parsed once for the sizes, the weights and the tokenizer
    gguf = isinstance(opened, GGUFSource)
    elements = sum(s.elements for s in opened.specs)
    report: dict[str, Any] = {"source": str(path), "out": str(out)}
    with tokenizer_files_of(path, opened.file if gguf else None) as tokenizer_files:
        if gguf:
            dtype = dtype or ("bfloat16" if quantize else None)  # float32 decode -> a 16-bit store
        model = load_model(opened, compute="float32" if gguf and quantize else "native", kquant=requantize, lazy=True)
        if gguf:
            report["gguf_tensors"] = gguf_import_report(opened.specs, requantize, quantize,
                                                        model.load_report.requant_errors)
        if adapter_path is not None:
            from ..model.adapters import fuse, load_adapters

            fuse(load_adapters(model, adapter_path), dequantize=dequantize or quantize)
            report["adapters"] = str(adapter_path)
        if dtype:
            cast_floats(model, getattr(mx, dtype))
        if quantize:
            quantize_model(model, bits, group_size, mode, recipe)
        quant = quantization_block(model)
        nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        described = "unquantized" if not quant else (
            f"{quant.get('mode', 'affine')} {quant['bits']}-bit, group {quant['group_size']}"
            + (" (+ per-layer entries)" if any(isinstance(v, dict) for v in quant.values()) else "")
            + (f", recipe {recipe}" if recipe else ""))
        save_model(model, out, tokenizer_files=tokenizer_files, card=model_card(source, model, described))
    return {**report, "weights": described, "bytes": nbytes, "bits_per_weight": 8 * nbytes / elements}
