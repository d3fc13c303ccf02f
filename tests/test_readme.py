"""The README's quick start, run as a newcomer would after ``make setup``: its first output must show
the model working."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_start_answers(smollm2_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)\n```", readme, re.S).group(1)
    command = block.split("&&", 1)[1].strip()  # what follows `make setup`
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/mlxllm"
    argv[0] = str(Path(sys.executable).with_name("mlxllm"))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tokens-per-sec" in proc.stderr  # --verbose timings go to stderr
