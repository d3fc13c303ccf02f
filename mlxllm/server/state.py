"""What every endpoint shares: the worker, the served model's name, and the checks and helpers the
two APIs both use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HTTPRequest

from ..engine.requests import Event, Request
from .errors import ApiError
from .worker import Worker, collect


@dataclass
class ServerState:
    worker: Worker
    model_name: str
    fingerprint: str = ""
    tool_parser: str | None = None  # --tool-parser; None: chosen from the chat template
    reasoning_budget: int | None = None  # --reasoning-budget: thinking tokens a reply may take (None: no cap)
    adapters: tuple[str, ...] = ()  # --adapter names: a request picks one with model "<name>:<adapter>"
    created: int = field(default_factory=lambda: int(time.time()))

    def tokenizer(self) -> Any:
        self.worker.engine()  # NotReady while loading
        return self.worker.loaded.tokenizer

    @property
    def trims(self) -> bool:
        """Whether every layer's cache can be trimmed (no sliding window), so no boundary snapshots are needed."""
        return self.worker.engine().trims

    async def complete(self, req: Request, http: HTTPRequest) -> tuple[str, list[Event]]:
        """Run ``req`` to the end (cancelled if the client disconnects meanwhile)."""
        return await collect(self.worker.open(req, http.is_disconnected))

    def model_card(self, name: str | None = None) -> dict[str, Any]:
        return {"id": name or self.model_name, "object": "model", "created": self.created, "owned_by": "mlxllm"}

    def model_ids(self) -> list[str]:
        """The base model and each adapter on it, as ``/v1/models`` lists them."""
        return [self.model_name] + [f"{self.model_name}:{a}" for a in self.adapters]

    def adapter_for(self, model: str | None) -> int:
        """The adapter a request's ``model`` names (``<name>:<adapter>``; 0: the base model). Other
        names get the base model, as before; ``<this model>:<unknown>`` is a 404."""
        base, _, suffix = (model or "").rpartition(":")
        if base and suffix in self.adapters:
            return self.adapters.index(suffix) + 1
        if base == self.model_name:
            raise ApiError(f"the model {model!r} does not exist; this server serves {', '.join(self.model_ids())}", 404)
        return 0
