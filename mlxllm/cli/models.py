"""``mlxllm info``, ``mlxllm convert`` and ``mlxllm fuse``: describe a model, or write one.

The readers and writers are imported inside the commands, so ``mlxllm --help`` does not pay for them.
"""

from __future__ import annotations

import json

import click

from .options import (adapter_path_option, force_option, json_option, model_option, out_dir_option, q_bits_option,
                      q_group_size_option, verbose_option)


@click.command("info")
@click.argument("model_spec", required=False)
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Also show the memory each of N tensor-parallel ranks (mlx.launch -n N) needs.")
@json_option("Print JSON.")
@verbose_option()
def info_command(model_spec, ranks, as_json, verbose) -> None:
    """Architecture, parameter count, quantization, context length and memory needed."""
    from ..formats.loader import describe_model
    from ..formats.hub import resolve

    facts = describe_model(resolve(model_spec), ranks=ranks)
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        click.echo(f"{key:<{width}}  {value}")


@click.command("convert")
@model_option(required=True, help="HF / mlx-community directory or Hub repo id.")
@out_dir_option
@click.option("--quantize", "-q", is_flag=True, help="Quantize the linear maps, embeddings and experts.")
@q_bits_option(default=4, show_default=True)
@q_group_size_option
@click.option("--q-mode", default="affine", show_default=True)
@click.option("--recipe", default=None, help="Mixed precision, e.g. mixed_3_6 (3 bits, 6 for the sensitive layers).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast unquantized weights (default: keep the source's).")
@click.option("--requantize", type=click.Choice(["q8", "q4", "float"]), default="q8", show_default=True,
              help="GGUF block types MLX lacks (K-quants, Q5_x, IQ*): MLX 8-bit, 4-bit, or 16-bit float.")
@force_option
@json_option("Print what was done as JSON.")
@verbose_option()
def convert_command(model_spec, out, quantize, q_bits, q_group_size, q_mode, recipe, dtype, requantize, force,
                    as_json, verbose) -> None:
    """Write a model in the mlx-community layout (loads in mlxllm and mlx-lm), optionally quantized."""
    from rich.console import Console

    from ..tools.conversion import convert as run

    with Console(stderr=True).status(f"converting {model_spec} ..."):
        report = run(model_spec, out, quantize=quantize, bits=q_bits, group_size=q_group_size, mode=q_mode,
                     dtype=dtype, recipe=recipe, requantize=requantize, force=force)
    if as_json:
        click.echo(json.dumps(report))
        return
    for row in report.get("gguf_tensors", []):
        error = f", +{100 * row['added_rms_error']:.2f} % RMS error" if "added_rms_error" in row else ""
        click.echo(f"  {row['type']:>6}: {row['tensors']:4d} tensors, {row['action']}{error}")
    click.echo(f"wrote {report['out']}: {report['weights']}, {report['bytes'] / 2**20:.0f} MiB "
               f"({report['bits_per_weight']:.2f} bits per weight)")


@click.command("fuse")
@model_option(required=True, help="The base model the adapters were trained on.")
@adapter_path_option(required=True, help="Adapter folder.")
@out_dir_option
@click.option("--dequantize", is_flag=True, help="Write float weights even where the base was quantized.")
@q_bits_option(default=None, help="Quantize the fused model to this many bits.")
@q_group_size_option
@force_option
@json_option("Print what was done as JSON.")
@verbose_option()
def fuse_command(model_spec, adapter_path, out, dequantize, q_bits, q_group_size, force, as_json, verbose) -> None:
    """Merge adapters into the base weights: a standalone model in the mlx-community layout."""
    from rich.console import Console

    from ..tools.conversion import convert as run

    with Console(stderr=True).status(f"fusing {adapter_path} into {model_spec} ..."):
        report = run(model_spec, out, quantize=q_bits is not None, bits=q_bits or 4, group_size=q_group_size,
                     force=force, adapter_path=adapter_path, dequantize=dequantize)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"wrote {report['out']}: {report['weights']}, {report['bytes'] / 2**20:.0f} MiB")
