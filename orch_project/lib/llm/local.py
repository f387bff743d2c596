"""The embedded, offline, deterministic provider (ORCH_LLM_PROVIDER=local, the default).

It answers each task with the handler the flow registered for it (``FlowSpec.model_tasks``: a
trained classifier, an extractor, a scorer ...) and, for tasks without one, with the flow's
retrieval-grounded template ``prompts/<task>.local.txt`` filled from the request's context
(``$name`` placeholders; the output is ``{"text", "citations"}``, citations from ``context["citations"]``).
A task with neither is a provider error naming what is missing.
"""

from __future__ import annotations

import string
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..contracts import LLMStepRequest
from .gateway import ProviderResult, estimate_tokens


class LocalTask(Protocol):
    """A flow's embedded handler for one model task."""

    model: str  # the model name routing, cache keys and the ledger use (e.g. a versioned model id)

    def run(self, requests: Sequence[LLMStepRequest], prompt_vars: Mapping[str, Any]) -> list[ProviderResult]: ...


class UnavailableTask:
    """A registered task whose model is not there yet (e.g. never trained): every request fails with
    ``reason``, which says what to do."""

    def __init__(self, model: str, reason: str):
        self.model, self.reason = model, reason

    def run(self, requests, prompt_vars) -> list[ProviderResult]:
        return [ProviderResult(None, error="provider_error", reason=self.reason) for _ in requests]


class LocalProvider:
    name = "local"
    batch = True  # answers a whole batch in-process

    def __init__(self, tasks: Mapping[str, LocalTask], templates: Mapping[str, str]):
        self.tasks = dict(tasks)
        self.templates = dict(templates)

    @staticmethod
    def load_templates(templates_dir: Path) -> dict[str, str]:
        return {p.stem.removesuffix(".local"): p.read_text(encoding="utf-8")
                for p in Path(templates_dir).glob("*.local.txt")}

    @property
    def models(self) -> dict[str, str]:
        """Task -> model name of the registered handlers (routing uses them for the local candidates)."""
        return {task: h.model for task, h in self.tasks.items()}

    def run(self, task: str, model: str, requests: Sequence[LLMStepRequest],
            prompt_vars: dict | None = None) -> list[ProviderResult]:
        handler = self.tasks.get(task.split(".")[0])
        if handler is not None:
            return handler.run(requests, prompt_vars or {})
        if task in self.templates:
            return self._template(task, requests)
        return [ProviderResult(None, error="provider_error",
                               reason=f"the local provider has no handler and no prompts/{task}.local.txt for "
                                      f"task {task!r}") for _ in requests]

    def _template(self, task: str, requests: Sequence[LLMStepRequest]) -> list[ProviderResult]:
        tpl = string.Template(self.templates[task])
        out = []
        for r in requests:
            t0 = time.perf_counter()
            ctx = r.inputs.context
            try:
                text = tpl.substitute({k: v for k, v in ctx.items() if isinstance(v, str)})
            except (KeyError, ValueError) as exc:
                out.append(ProviderResult(None, error="schema_mismatch", reason=f"template needs {exc}"))
                continue
            out.append(ProviderResult(
                {"text": text.strip(), "citations": list(ctx.get("citations") or [])},
                estimate_tokens(r.inputs.text) + estimate_tokens(str(ctx)), estimate_tokens(text),
                (time.perf_counter() - t0) * 1000.0))
        return out
