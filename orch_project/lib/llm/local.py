"""The embedded, offline, deterministic provider: the trained triage model for classification
and retrieval-grounded templates for drafting. Used by default (ORCH_LLM_PROVIDER=local)."""

from __future__ import annotations

import string
import time
from collections.abc import Sequence
from pathlib import Path

from ..contracts import LLMStepRequest
from .gateway import ProviderResult, estimate_tokens
from .triage_model import TriageModel


class LocalProvider:
    name = "local"
    batch = True  # answers a whole batch in-process

    def __init__(self, triage_model: TriageModel | None, templates: dict[str, str]):
        self.triage_model = triage_model
        self.templates = templates

    @classmethod
    def from_files(cls, model_path: Path | None, templates_dir: Path) -> "LocalProvider":
        model = TriageModel.load(model_path) if model_path else None
        templates = {p.stem.removesuffix(".local"): p.read_text(encoding="utf-8")
                     for p in Path(templates_dir).glob("*.local.txt")}
        return cls(model, templates)

    def run(self, task: str, model: str, requests: Sequence[LLMStepRequest],
            prompt_vars: dict | None = None) -> list[ProviderResult]:
        if task == "triage":
            return self._triage(requests)
        if task in self.templates:
            return self._template(task, requests)
        return [ProviderResult(None, error="provider_error", reason=f"local provider has no task {task!r}")
                for _ in requests]

    def _triage(self, requests: Sequence[LLMStepRequest]) -> list[ProviderResult]:
        if self.triage_model is None:
            return [ProviderResult(None, error="provider_error",
                                   reason="no triage model: materialise the triage_model asset first")
                    for _ in requests]
        t0 = time.perf_counter()
        labels, confs = self.triage_model.predict([r.inputs.text for r in requests])
        per_item = (time.perf_counter() - t0) * 1000.0 / max(1, len(requests))
        return [ProviderResult({"label": lab, "confidence": conf, "model_version": self.triage_model.version},
                               estimate_tokens(r.inputs.text), 8, per_item)
                for r, lab, conf in zip(requests, labels, confs)]

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
                {"label": task, "confidence": float(ctx.get("grounding_score", 1.0)), "text": text.strip(),
                 "citations": [ctx.get("article_id")] if ctx.get("article_id") else []},
                estimate_tokens(r.inputs.text) + estimate_tokens(str(ctx)), estimate_tokens(text),
                (time.perf_counter() - t0) * 1000.0))
        return out
