"""``python -m mlxllm`` is the ``mlxllm`` command."""

from .cli import main

main()
