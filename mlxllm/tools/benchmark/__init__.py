"""What ``mlxllm bench`` measures: time to first token, prefill and decode speed, and how close they
come to what the device can do.

``cost`` counts the bytes a decode step reads and the FLOPs a prefill computes from the loaded model's
arrays; ``probes`` measures the device's read bandwidth and matmul peaks on the spot with MLX;
``trials`` times generations; ``runner`` is the whole run behind one progress bar; ``report`` shows it
as tables and a plot. The names callers use are re-exported here.
"""

from .cost import _keys_seen, _macs_per_token, activation_dtype, decode_weight_bytes, kv_bytes, prefill_flops
from .probes import PUBLISHED_GBPS, best_times, gemv_blocks, gemv_chain, measure_peaks, published_bandwidth
from .report import plot_sweep, print_report
from .runner import run_bench
from .trials import (LengthResult, Trial, bench_length, bench_speculative, check_lengths, prompt_text, run_trial,
                     speculative_trial, summary, sweep_lengths)

__all__ = [
    "PUBLISHED_GBPS", "LengthResult", "Trial", "activation_dtype", "bench_length", "bench_speculative", "best_times",
    "check_lengths", "decode_weight_bytes", "gemv_blocks", "gemv_chain", "kv_bytes", "measure_peaks", "plot_sweep",
    "prefill_flops", "print_report", "prompt_text", "published_bandwidth", "run_bench", "run_trial",
    "speculative_trial", "summary", "sweep_lengths",
]
