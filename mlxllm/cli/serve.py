"""``mlxllm serve``: the OpenAI- and Anthropic-compatible HTTP server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from .. import backend
from ..errors import UserError
from .options import adapter_option, compute_option, draft_options, kv_options, model_option, verbose_option

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


class Size(click.ParamType):
    """A byte count: ``4GB``, ``512MiB``, ``1.5g`` or plain bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size such as 4GB, 512MiB or 1000000", param, ctx)
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@click.command("serve")
@model_option(default=None, help="GGUF file, HF/mlx-community directory, or Hub repo id (default: bundled SmolLM2).")
@compute_option(default="auto", show_default=True, help="Weight representation (as for generate).")
@adapter_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--model-name", default=None, help="The model id the API reports and accepts (default: from --model).")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sequences decoding together.")
@click.option("--max-step-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per engine step, decode rows first; the rest reads newcomers' prompts.")
@click.option("--prefill-share", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="While streams run, a step reads at most this many decode steps' time of prompt per "
                   "request waiting (for one long prompt, streams at about 2x their inter-token latency; "
                   "higher: faster prompts; 0: no limit).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for admission; past it the server answers 503.")
@click.option("--max-memory", type=Size(), default=None,
              help="Weights + KV + prefix cache stay under this (default: what the device can hold).")
@click.option("--prompt-cache-bytes", type=Size(), default=None,
              help="Prefix cache budget (default: a quarter of what --max-memory leaves after the weights; 0 = off).")
@click.option("--prompt-cache-dir", type=click.Path(file_okay=False), default=None,
              help="Keep cached prefixes here as safetensors files, reloaded after a restart.")
@kv_options
@click.option("--api-key", default=lambda: os.environ.get("MLXLLM_API_KEY"),
              help="Require this key (Authorization: Bearer or x-api-key) [env MLXLLM_API_KEY].")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browser requests from this origin (repeatable).")
@click.option("--chat-template", type=click.Path(dir_okay=False), default=None,
              help="A Jinja chat template file to use instead of the model's.")
@click.option("--tool-parser", default=None, metavar="FORMAT",
              help="How the model writes tool calls: hermes, llama3, mistral or json (default: from the chat template).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Also serve this LoRA adapter; a request picks it with model \"<model name>:NAME\" (repeatable).")
@draft_options("Speculative decoding in the batch: a small model with the same tokenizer drafts tokens for "
               "greedy requests.", "Tokens the draft model proposes per round.")
@click.option("--reasoning-budget", type=click.IntRange(min=0), default=None,
              help="Thinking tokens a reply of a reasoning model may take before its thought is closed (default: no cap).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM.")
@click.option("--max-body-bytes", type=Size(), default="4MiB", show_default=True, help="Largest request body accepted.")
@verbose_option(help="Debug logging.")
def serve_command(model_spec, compute, adapter_path, host, port, model_name, max_batch, max_step_tokens, prefill_share,
                  max_queue, max_memory, prompt_cache_bytes, prompt_cache_dir, kv, api_key, cors_origins, chat_template,
                  adapters, tool_parser, reasoning_budget, draft_model, num_draft_tokens, shutdown_timeout, max_body_bytes,
                  verbose) -> None:
    """Serve a model over HTTP: OpenAI (/v1/chat/completions, /v1/completions, /v1/models) and
    Anthropic (/v1/messages) APIs with continuous batching and a prefix cache."""
    from ..server.launch import ServeOptions, run_server

    template = None
    if chat_template is not None:
        try:
            template = (Path(chat_template).read_text(encoding="utf-8"), chat_template)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--chat-template {chat_template}: {getattr(e, 'strerror', None) or e}") from None
        from ..tokenize.chat import ChatTemplate

        ChatTemplate(*template)  # one that does not compile stops here, before the model loads
    if api_key == "":
        raise UserError("--api-key must not be empty")
    group = backend.rank_group()
    if group is not None and group.size() > 1:
        raise UserError(f"serve runs on one rank for now (this is {group.size()}): use generate or bench under mlx.launch")
    served = []
    for spec in adapters:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder or ":" in name:
            raise UserError(f"--adapter takes NAME=PATH (a name without ':'), not {spec!r}")
        if not Path(folder, "adapter_config.json").is_file():
            raise UserError(f"--adapter {name}: {folder} has no adapter_config.json")
        served.append((name, folder))
    if tool_parser is not None:
        from ..engine.tool_calls import TOOL_FORMATS

        if tool_parser not in TOOL_FORMATS:
            raise UserError(f"--tool-parser must be one of {', '.join(TOOL_FORMATS)}, not {tool_parser!r}")
    run_server(ServeOptions(
        model=model_spec, compute=compute, adapter_path=adapter_path, host=host, port=port, model_name=model_name,
        max_batch=max_batch, max_step_tokens=max_step_tokens, prefill_share=prefill_share, max_queue=max_queue,
        max_memory=max_memory,
        prompt_cache_bytes=prompt_cache_bytes, prompt_cache_dir=prompt_cache_dir, kv=kv, api_key=api_key,
        cors_origins=tuple(cors_origins), chat_template=template, tool_parser=tool_parser, reasoning_budget=reasoning_budget, adapters=tuple(served),
        draft_model=draft_model, num_draft_tokens=num_draft_tokens,
        shutdown_timeout=shutdown_timeout,
        max_body_bytes=max_body_bytes, log_level="DEBUG" if verbose else "INFO"))
