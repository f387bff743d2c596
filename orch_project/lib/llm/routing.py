"""Routing policy for the LLM gateway: per task, ordered candidates (provider + model) with their
price, latency budget and capabilities, the cache policy, timeouts and the circuit breaker's
thresholds. Each flow ships a ``routing.yaml``; the router ranks candidates per call by health,
observed latency and cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

PAID_PROVIDERS = {"openai"}


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["local", "openai"]
    model: str
    cost_in_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 input tokens")
    cost_out_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 output tokens")
    latency_budget_ms: float = Field(10_000, gt=0, description="demote the candidate when its observed p50 is above")
    capabilities: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.provider}:{self.model}"

    @property
    def metered(self) -> bool:
        """Paid providers draw on the brief's token budget; the embedded provider does not."""
        return self.provider in PAID_PROVIDERS

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens / 1000.0 * self.cost_in_per_1k + output_tokens / 1000.0 * self.cost_out_per_1k


class CachePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = True
    semantic: bool = Field(False, description="opt-in: reuse an answer for a near-identical masked input")
    semantic_threshold: float = Field(0.95, gt=0, le=1)


class TaskPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ordered", "cheapest"] = "ordered"
    requires: tuple[str, ...] = Field((), description="capabilities a candidate must have")
    max_output_tokens: int = Field(256, gt=0)
    timeout_s: float | None = Field(None, gt=0, description="per call; default: the gateway's timeout_s")
    cache: CachePolicy = CachePolicy()
    candidates: list[Candidate]


class BreakerPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open the circuit")
    cooldown_s: float = Field(30.0, ge=0, description="open this long before a half-open probe")
    half_open_probes: int = Field(1, ge=1, description="calls let through while half-open")


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(16, ge=1, description="model calls in flight per step")
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0, description="SDK retries: exponential backoff with jitter, honours Retry-After")
    circuit_breaker: BreakerPolicy = BreakerPolicy()
    tasks: dict[str, TaskPolicy]

    @classmethod
    def load(cls, path: Path) -> "RoutingConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))

    def for_provider(self, default: str, *, openai_models: dict[str, str] | None = None,
                     local_models: dict[str, str] | None = None) -> "RoutingConfig":
        """The policy as run: ``local`` keeps only embedded candidates (no keys, no network);
        ``openai`` puts the OpenAI-compatible candidates first and keeps the embedded ones as the
        last fallback. Model names may be overridden per task (e.g. ORCH_OPENAI_MODELS)."""
        if default not in ("local", "openai"):
            raise ValueError(f"unknown LLM provider {default!r}: use 'local' or 'openai'")
        tasks = {}
        for name, pol in self.tasks.items():
            cands = []
            for c in pol.candidates:
                if default == "local" and c.provider != "local":
                    continue
                if c.provider == "openai" and openai_models and name in openai_models:
                    c = c.model_copy(update={"model": openai_models[name]})
                if c.provider == "local" and local_models and name in local_models:
                    c = c.model_copy(update={"model": local_models[name]})
                if c not in cands:
                    cands.append(c)
            cands.sort(key=lambda c: c.provider != default)  # stable: keeps config order within a provider
            tasks[name] = pol.model_copy(update={"candidates": cands})
        return self.model_copy(update={"tasks": tasks})


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    rank: int
    reason: str


def rank(policy: TaskPolicy, *, default_provider: str, est_input_tokens: int, open_circuits: set[str],
         observed_p50_ms: dict[str, float]) -> list[Ranked]:
    """Candidates in the order the router will try them, each with the reason for its place.

    Order: the default provider's candidates before the others; healthy (circuit not open) before
    open; within the latency budget before over it; then config order (``ordered``) or expected
    cost, then observed latency (``cheapest``). Candidates lacking a required capability are dropped.
    """
    scored = []
    for pos, c in enumerate(policy.candidates):
        if not set(policy.requires) <= set(c.capabilities):
            continue
        p50 = observed_p50_ms.get(c.key)
        slow = p50 is not None and p50 > c.latency_budget_ms
        cost = c.cost(est_input_tokens, policy.max_output_tokens)
        tiebreak = (cost, p50 or 0.0, pos) if policy.strategy == "cheapest" else (pos,)
        notes = []
        if c.key in open_circuits:
            notes.append("circuit open")
        if slow:
            notes.append(f"p50 {p50:.0f} ms over budget {c.latency_budget_ms:.0f} ms")
        if policy.strategy == "cheapest":
            notes.append(f"est ${cost:.6f}")
        scored.append(((c.provider != default_provider, c.key in open_circuits, slow, *tiebreak), c, notes))
    scored.sort(key=lambda t: t[0])
    return [Ranked(c, i, ", ".join([policy.strategy, *notes])) for i, (_, c, notes) in enumerate(scored)]
