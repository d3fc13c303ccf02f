"""What every endpoint shares: the worker, the served model's name, and the checks and helpers the
two APIs both use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HTTPRequest

from ..engine.requests import Event, Request
from .worker import Worker, collect


@dataclass
class ServerState:
    worker: Worker
    model_name: str
    fingerprint: str = ""
    tool_parser: str | None = None  # --tool-parser; None: chosen from the chat template
    reasoning_budget: int | None = None  # --reasoning-budget: thinking tokens a reply may take (None: no cap)
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

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mlxllm"}
