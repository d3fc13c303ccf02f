"""The package's shape as a checked contract: the layering (import-linter), no import cycles, a public
namespace that no submodule can shadow, and the size limits the README's "Layout" section promises."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlxllm

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def _submodules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(mlxllm.__path__, "mlxllm.") if not m.name.endswith("__main__")]


def test_layer_contract_holds():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("where, line, broken", [
    # a model module reaching up into the engine: a layer violation
    ("mlxllm/model/rope.py", "from ..engine import steps  # noqa", "each layer imports only layers below it"),
    # a lazy (function-level) upward import counts too
    ("mlxllm/tokenize/chat.py", "def _up():\n    from ..formats import loader  # noqa", "each layer imports only"),
    # two modules of one layer importing each other: a cycle
    ("mlxllm/model/rope.py", "from . import decoder  # noqa", "No import cycles"),
    # a new top-level module nobody placed in a layer
    ("mlxllm/stray.py", "from . import errors  # noqa", "each layer imports only layers below it"),
])
def test_contract_catches_violations(tmp_path, where, line, broken):
    """The contract is only worth having if it fails: break a copy of the package and lint it."""
    shutil.copytree(ROOT / "mlxllm", tmp_path / "mlxllm", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / where
    target.write_text((target.read_text() if target.exists() else "") + "\n\n" + textwrap.dedent(line) + "\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert broken in proc.stdout and "BROKEN" in proc.stdout


def test_public_names_survive_importing_every_submodule():
    """``mlxllm.load`` once became the ``mlxllm/load/`` module after first use: no public name may be a
    submodule, and importing them all must leave each name the documented object."""
    from mlxllm.engine import grammar, sample, stream
    from mlxllm.formats import loader

    documented = {"load": loader.load, "generate": stream.generate, "stream_generate": stream.stream_generate,
                  "GenerationResponse": stream.GenerationResponse, "make_sampler": sample.make_sampler,
                  "make_logits_processors": sample.make_logits_processors, "Grammar": grammar.Grammar}
    assert set(mlxllm.__all__) == set(documented)
    names = _submodules()
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)
    for name, obj in documented.items():
        assert importlib.util.find_spec(f"mlxllm.{name}") is None, f"mlxllm.{name} is also a module"
        assert getattr(mlxllm, name) is obj, name
        assert callable(getattr(mlxllm, name))


def test_load_twice_fresh_process_and_thread(smollm2_path, gemma3_path):
    """Two models through the public API in one process: after the first load, after every submodule
    is imported, and from a second thread."""
    script = textwrap.dedent(f"""
        import importlib, pkgutil, threading
        import mlxllm
        a, tok_a = mlxllm.load({str(smollm2_path)!r})
        for m in pkgutil.walk_packages(mlxllm.__path__, "mlxllm."):
            if not m.name.endswith("__main__"):
                importlib.import_module(m.name)
        out = {{}}
        t = threading.Thread(target=lambda: out.update(b=mlxllm.load({str(gemma3_path)!r})))
        t.start(); t.join()
        b, tok_b = out["b"]
        c, _ = mlxllm.load({str(smollm2_path)!r})
        for model, tok in ((a, tok_a), (b, tok_b), (c, tok_a)):
            text = mlxllm.generate(model, tok, "The capital of France is", max_tokens=4)
            print(model.config.model_type, repr(text))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["llama", "gemma3_text", "llama"]
    assert lines[0] == lines[2]  # the same model loaded again answers the same


def _package_files() -> list[Path]:
    return sorted((ROOT / "mlxllm").rglob("*.py"))


def test_modules_are_short_or_say_why():
    """No module over ~400 lines without a reason stated in its docstring ("Longer than ...")."""
    long = []
    for path in _package_files():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > 420 and "Longer than" not in doc:
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, long


def test_engine_and_cli_functions_are_short():
    too_long = []
    for path in _package_files():
        if path.parent.name not in ("engine", "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > 85:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not too_long, too_long


def test_no_public_function_is_named_like_a_module():
    """``from mlxllm.x import y`` must never be ambiguous between a function and a module."""
    modules = {Path(name.rsplit(".", 1)[-1]).name for name in _submodules()}
    clashes = []
    for path in _package_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in modules:
                clashes.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not clashes, clashes
