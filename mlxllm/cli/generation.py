"""``mlxllm generate`` and ``mlxllm chat``: text from a model, once or turn by turn.

The engine is imported inside the commands, so ``mlxllm --help`` does not pay for it.
"""

from __future__ import annotations

import json
import sys

import click

from ..errors import UserError
from .options import (adapter_option, draft_options, grammar_options, json_option, load_for_command, model_options,
                      sampling_kwargs, sampling_options, system_option)


def _build_prompt(tokenizer, prompt: str, system: str | None, chat: bool | None) -> str:
    """The text the model sees: the chat template applied when asked for (or when the model has one)."""
    use_chat = tokenizer.has_chat_template if chat is None else chat
    if use_chat and not tokenizer.has_chat_template:
        raise UserError("--chat: this model has no chat template")
    if not use_chat:
        if system:
            raise UserError("--system needs a chat template (use --chat with a chat model)")
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@click.command("generate")
@model_options
@adapter_option
@sampling_options
@click.option("--prompt", "-p", default="hello", show_default=True, help="Prompt text, or - to read stdin.")
@system_option("System message (chat models).")
@click.option("--chat/--no-chat", default=None, help="Apply the model's chat template (default: when it has one).")
@draft_options("Speculative decoding: a small model with the same tokenizer drafts tokens the model verifies.",
               "Tokens the draft model proposes per round.")
@grammar_options
@json_option("Print one JSON object with the text and the timings.")
def generate_command(model_spec, compute, verbose, adapter_path, prompt, system, chat, draft_model, num_draft_tokens,
                     grammar, as_json, **kw) -> None:
    """Generate a completion for a prompt."""
    from ..engine.stream import format_stats, stream_generate

    sampling = {**sampling_kwargs(kw), "grammar": grammar}
    if prompt == "-":
        prompt = sys.stdin.read()
    model, tokenizer = load_for_command(model_spec, compute, verbose, adapter_path)
    if draft_model is not None:
        from ..formats.loader import load_draft

        sampling.update(draft_model=load_draft(draft_model, compute, tokenizer), num_draft_tokens=num_draft_tokens)
    text = _build_prompt(tokenizer, prompt, system, chat)
    out, last = [], None
    for last in stream_generate(model, tokenizer, text, kw["max_tokens"], **sampling):
        out.append(last.text)
        if not as_json:
            click.echo(last.text, nl=False)
    if as_json:
        fields = ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory",
                  "finish_reason", "ttft") + (("draft_acceptance",) if draft_model else ())
        record = {"text": "".join(out), **({k: getattr(last, k) for k in fields} if last else {})}
        click.echo(json.dumps(record))
        return
    click.echo()
    if verbose and last is not None:
        click.echo(format_stats(last), err=True)


@click.command("chat")
@model_options
@adapter_option
@sampling_options
@system_option("System message.")
def chat_command(model_spec, compute, verbose, adapter_path, system, **kw) -> None:
    """Multi-turn chat. /reset clears the history, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply.
    The KV cache is kept between turns, so a turn computes only the new messages."""
    sampling = sampling_kwargs(kw)
    model, tokenizer = load_for_command(model_spec, compute, verbose, adapter_path)
    if not tokenizer.has_chat_template:
        raise UserError("this model has no chat template; use `mlxllm generate` instead")
    if tokenizer.chat_template_error:
        raise UserError(tokenizer.chat_template_error)
    start = [{"role": "system", "content": system}] if system else []
    kv = sampling.pop("kv")  # the kept cache carries the KV settings
    _chat_loop(model, tokenizer, start, kv, kw["max_tokens"], sampling, verbose)


def _chat_loop(model, tokenizer, start: list[dict], kv, max_tokens: int, sampling: dict, verbose: bool) -> None:
    """Read lines until /exit or end of input; Ctrl-C at the prompt only abandons the line."""
    from ..engine.prompt_cache import PromptCache
    from ..engine.stream import format_stats

    history = list(start)
    kept = PromptCache(model, kv)
    click.echo("Chat: /reset clears the history, /exit leaves. Ctrl-C stops a reply.", err=True)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = list(start)
            kept = PromptCache(model, kv)
            click.echo("(history cleared)", err=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply, last = _chat_turn(model, tokenizer, history, kept, max_tokens, sampling)
        history.append({"role": "assistant", "content": reply})
        if verbose and last is not None:
            click.echo(format_stats(last), err=True)


def _chat_turn(model, tokenizer, history: list[dict], kept, max_tokens: int, sampling: dict):
    """Stream one reply to ``history`` and return ``(reply, last response)``. Only the part of the prompt
    the kept cache lacks goes through the model; Ctrl-C stops the reply and keeps what was said."""
    from ..engine.stream import encode_prompt, stream_generate

    ids = encode_prompt(tokenizer, tokenizer.apply_chat_template(history, add_generation_prompt=True)).tolist()
    todo = kept.suffix(ids)
    reply, last, generated = "", None, []
    try:
        for last in stream_generate(model, tokenizer, todo, max_tokens, prompt_cache=kept.cache, **sampling):
            generated.append(last.token)
            reply += last.text
            click.echo(last.text, nl=False)
    except KeyboardInterrupt:
        click.echo(" [stopped]", nl=False)
    kept.record(ids + generated)
    click.echo()
    return reply, last
