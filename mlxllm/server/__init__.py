"""``mlxllm serve``: the OpenAI- and Anthropic-compatible HTTP server over the batching engine.

``app`` (routes, key, limits, errors) -> ``openai_api`` / ``anthropic_api`` (each API's wire format)
-> ``state`` / ``prompts`` -> ``worker`` (the engine thread and the bridge to the event loop) and
``metrics``; ``launch`` starts it all.
"""
