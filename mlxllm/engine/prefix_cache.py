"""The cross-request prefix cache: KV states of token prefixes, found through a token trie, kept
LRU under a byte budget, optionally persisted as safetensors files.

A request reuses the longest cached prefix of its prompt. An entry longer than the shared prefix
serves it too when its caches can be trimmed back; a sliding-window ring that has wrapped cannot
(trimming would need the positions it overwrote), so for such models the engine also stores
snapshots at message boundaries, which later turns of a chat share exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..files import write_atomic
from ..model.cache.snapshot import caches_nbytes, load_caches, save_caches

log = logging.getLogger("mlxllm.prefix_cache")


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    below: set[tuple[int, ...]] = field(default_factory=set)  # entries at or under this node
    entry: tuple[int, ...] | None = None


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    caches: list
    nbytes: int
    path: Path | None = None


class PrefixCache:
    """Prefix KV states under ``max_bytes``. ``lookup`` hands out independent copies, so entries are
    never changed by the requests that use them; ``model_key`` names the model (and KV settings) an
    entry belongs to, and files of another key in ``directory`` are left alone."""

    def __init__(self, max_bytes: int, directory: str | os.PathLike[str] | None = None, model_key: str = "") -> None:
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else None
        self.model_key = model_key
        self._root = _Node()
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # the engine thread writes; metrics read from the HTTP side
        self.nbytes = 0
        self.hits = self.lookups = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._reload()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: list[int]) -> tuple[list | None, int]:
        """Per-sequence caches holding the longest reusable prefix of ``tokens`` (at most all but the
        last token, which must go through the model for logits) and its length; ``(None, 0)`` if none."""
        with self._lock:
            self.lookups += 1
            limit = len(tokens) - 1
            node, depth, exact = self._root, 0, None
            while depth < limit and tokens[depth] in node.children:
                node = node.children[tokens[depth]]
                depth += 1
                if node.entry is not None:
                    exact = node.entry
            for key in sorted(node.below, key=len) if depth else ():  # longer entries sharing ``depth`` tokens
                if len(key) <= depth:
                    continue
                caches = [c.copy() for c in self._entries[key].caches]
                if all(c.trim(len(key) - depth) for c in caches):
                    return self._hit(key, caches, depth)
                break  # one that cannot trim means none can: every entry has the same cache kinds
            if exact is None:
                return None, 0
            return self._hit(exact, [c.copy() for c in self._entries[exact].caches], len(exact))

    def _hit(self, key: tuple[int, ...], caches: list, n: int) -> tuple[list, int]:
        self._entries.move_to_end(key)
        self.hits += 1
        return caches, n

    def insert(self, tokens: list[int], caches: list, replaces_prefixes: bool = False) -> None:
        """Keep ``caches`` (per-sequence caches holding exactly ``tokens``; the caller's, not copied).
        ``replaces_prefixes``: the caches can be trimmed, so entries for leading parts of ``tokens``
        are dropped (this one serves them)."""
        key = tuple(tokens)
        if not key:
            return
        mx.eval([c.state for c in caches])
        nbytes = caches_nbytes(caches)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            if replaces_prefixes:
                for shorter in self._prefixes_of(key):
                    self._remove(shorter)
            if nbytes > self.max_bytes:
                return
            entry = _Entry(key, caches, nbytes)
            self._add(entry)
            self._shrink(self.max_bytes)
        if self.directory is not None and key in self._entries:
            self._persist(entry)

    def _prefixes_of(self, key: tuple[int, ...]) -> list[tuple[int, ...]]:
        node, found = self._root, []
        for t in key[:-1]:
            node = node.children.get(t)
            if node is None:
                break
            if node.entry is not None:
                found.append(node.entry)
        return found

    def _add(self, entry: _Entry) -> None:
        node = self._root
        node.below.add(entry.tokens)
        for t in entry.tokens:
            node = node.children.setdefault(t, _Node())
            node.below.add(entry.tokens)
        node.entry = entry.tokens
        self._entries[entry.tokens] = entry
        self.nbytes += entry.nbytes

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        node, path = self._root, []
        for t in key:
            path.append((node, t))
            node.below.discard(key)
            node = node.children[t]
        node.below.discard(key)
        node.entry = None
        for parent, t in reversed(path):  # prune branches nothing is under any more
            if parent.children[t].below:
                break
            del parent.children[t]
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)

    def _shrink(self, limit: int) -> None:
        while self._entries and self.nbytes > limit:
            self._remove(next(iter(self._entries)))

    def release(self, need: int) -> int:
        """Evict least recently used entries until ``need`` more bytes are free under the budget or
        none is left; returns the bytes freed (admission control calls this when memory is short)."""
        with self._lock:
            before = self.nbytes
            self._shrink(max(0, self.nbytes - need))
            return before - self.nbytes

    # persistence
    def _file_for(self, key: tuple[int, ...]) -> Path:
        digest = hashlib.sha256(json.dumps([self.model_key, list(key)]).encode()).hexdigest()[:32]
        return self.directory / f"prefix-{digest}.safetensors"

    def _persist(self, entry: _Entry) -> None:
        path = self._file_for(entry.tokens)
        meta = {"model": self.model_key, "tokens": json.dumps(list(entry.tokens))}
        try:
            write_atomic(path, lambda tmp: save_caches(tmp, entry.caches, meta))
            entry.path = path
        except OSError as e:
            log.warning("prefix cache: could not write %s (%s)", path, e)

    def _reload(self) -> None:
        files = sorted(self.directory.glob("prefix-*.safetensors"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                caches, meta = load_caches(path)
                if meta.get("model") != self.model_key:
                    continue  # another model's (or other KV settings'): not ours to judge
                tokens = tuple(int(t) for t in json.loads(meta["tokens"]))
                if caches[0].offset != len(tokens) or path != self._file_for(tokens):
                    raise ValueError("its tokens do not match its contents")
            except Exception as e:  # noqa: BLE001  (a damaged file of any kind is reported and skipped)
                log.warning("prefix cache: ignoring %s (%s)", path.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            with self._lock:
                if tokens not in self._entries:
                    self._add(_Entry(tokens, caches, caches_nbytes(caches), path))
                    self._shrink(self.max_bytes)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.nbytes, "hits": self.hits, "lookups": self.lookups}
