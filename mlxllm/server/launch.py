"""Starting and stopping the server: uvicorn listens on its own thread while the model loads and
then steps on the main thread; SIGTERM or Ctrl-C stops accepting, lets in-flight requests finish
(up to ``shutdown_timeout``) and exits cleanly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..backend import memory_limit
from ..engine.batching import BatchEngine
from ..engine.prefix_cache import PrefixCache
from ..errors import UserError
from ..model.cache import KVSettings
from .app import create_app
from .metrics import Metrics
from .state import ServerState
from .worker import Loaded, Worker

log = logging.getLogger("mlxllm.server")


@dataclass
class ServeOptions:
    model: str | None = None
    compute: str = "auto"
    adapter_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str | None = None
    max_batch: int = 32
    max_step_tokens: int = 512
    prefill_share: float = 0.8
    max_queue: int = 64
    max_memory: int | None = None  # bytes; None: what the device can hold
    prompt_cache_bytes: int | None = None  # None: a quarter of what --max-memory leaves after the weights
    prompt_cache_dir: str | None = None
    kv: KVSettings | None = None
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    chat_template: tuple[str, str] | None = None  # (template source, the file it came from)
    tool_parser: str | None = None  # None: the tool-call format the chat template shows
    reasoning_budget: int | None = None  # thinking tokens a reply may take (None: no cap)
    adapters: tuple[tuple[str, str], ...] = ()  # (name, folder): LoRA adapters requests pick per row
    draft_model: str | None = None  # speculative decoding in the batch (greedy rows)
    num_draft_tokens: int = 3
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 4 << 20
    log_level: str = "INFO"


def _model_key(model, opts: ServeOptions) -> str:
    """Names the weights, compute path and KV settings a cached prefix belongs to."""
    report = model.load_report
    path = Path(report.path)
    stat = path.stat() if path.exists() else None
    facts = [str(path.resolve()), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0, report.target,
             report.detail, repr(opts.kv), opts.adapter_path, opts.chat_template[0] if opts.chat_template else None]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:24]


def load_engine(opts: ServeOptions) -> Loaded:
    """Load the model and build the engine around it (on the engine thread)."""
    from mlx.utils import tree_flatten

    from ..engine.batch_draft import BatchDraft
    from ..formats.loader import load, load_draft
    from ..model.adapters import load_adapter_set

    model, tokenizer = load(opts.model, compute=opts.compute, adapter_path=opts.adapter_path)
    if opts.chat_template is not None:
        tokenizer.set_chat_template(*opts.chat_template)
    adapters = load_adapter_set(model, list(opts.adapters)) if opts.adapters else None
    draft = None
    if opts.draft_model is not None:
        draft = BatchDraft(model, load_draft(opts.draft_model, opts.compute, tokenizer), opts.num_draft_tokens)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    limit = opts.max_memory if opts.max_memory is not None else memory_limit()
    budget = opts.prompt_cache_bytes if opts.prompt_cache_bytes is not None else max(0, limit - weights) // 4
    prefix = PrefixCache(budget, opts.prompt_cache_dir, _model_key(model, opts)) if budget > 0 else None
    engine = BatchEngine(model, tokenizer, kv=opts.kv, max_batch=opts.max_batch, max_step_tokens=opts.max_step_tokens,
                         max_queue=opts.max_queue, max_memory=limit, prefix_cache=prefix, weights_bytes=weights,
                         prefill_share=opts.prefill_share, adapters=adapters, draft=draft)
    cached = f", {len(prefix)} cached prefixes reloaded" if prefix is not None and prefix.directory and len(prefix) else ""
    log.info("model ready: %s; memory limit %.2f GB, prefix cache %.2f GB%s", model.load_report, limit / 1e9,
             budget / 1e9, cached)
    return Loaded(engine, tokenizer)


def model_name(opts: ServeOptions) -> str:
    if opts.model_name:
        return opts.model_name
    if opts.model is None:
        return "SmolLM2-135M-Instruct"
    return Path(opts.model).stem if os.path.exists(opts.model) else opts.model


def run_server(opts: ServeOptions) -> None:
    """Run the server until SIGTERM / SIGINT."""
    import uvicorn

    logging.basicConfig(level=opts.log_level, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    metrics = Metrics()
    worker = Worker(lambda: load_engine(opts), metrics, on_load_failure=lambda: setattr(server, "should_exit", True))
    name = model_name(opts)
    state = ServerState(worker, name, tool_parser=opts.tool_parser, reasoning_budget=opts.reasoning_budget,
                        adapters=tuple(a for a, _ in opts.adapters))
    app = create_app(state, api_key=opts.api_key, cors_origins=opts.cors_origins, max_body_bytes=opts.max_body_bytes)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=opts.shutdown_timeout, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=64 * 1024, lifespan="off")
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, name="mlxllm-http", daemon=True)

    def on_signal(sig: int, frame: object) -> None:  # stop accepting; in-flight requests finish
        server.force_exit = server.should_exit  # a second signal: stop now
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    url = f"http://{host}:{opts.port}"
    key = ' -H "Authorization: Bearer $KEY"' if opts.api_key else ""
    print(f"mlxllm serve: {name} at {url}  (OpenAI {url}/v1, Anthropic {url}/v1/messages, {url}/health, "
          f"{url}/metrics)", file=sys.stderr, flush=True)
    print(f"  curl {url}/v1/chat/completions{key} -H 'Content-Type: application/json' "
          f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'", file=sys.stderr, flush=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.01)
    if not server.started:
        raise UserError(f"could not listen on {opts.host}:{opts.port} (in use, or not an address here)")
    worker.run(done=lambda: not http.is_alive())  # the engine steps until the HTTP side has shut down
    http.join(opts.shutdown_timeout + 5)
    if worker.load_error is not None:
        raise UserError(worker.load_error)
    log.info("stopped")
