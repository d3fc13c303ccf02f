"""``python -m mlxllm.cli`` is the ``mlxllm`` command too."""

from . import main

main()
