"""The one way a step reaches a model.

contract in -> masked-input guard -> exact cache -> provider candidates in order (fallback on
error) -> output validated against the step's pydantic model -> call ledger (tokens, latency,
cache hits) -> contract out. Steps hand over whole batches; a per-item failure comes back as a
contract error for that item and never fails the batch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from pydantic import ValidationError

from ..contracts import LLMOutput, LLMStepRequest, LLMStepResponse
from ..guardrails.pii import find_unmasked
from ..store import Database, chunked, llm_cache, llm_calls, utcnow


@dataclass
class ProviderResult:
    output: dict[str, Any] | None
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None  # one of the contract's error classes
    reason: str = ""


class Provider(Protocol):
    name: str

    def run(self, task: str, model: str, requests: Sequence[LLMStepRequest]) -> list[ProviderResult]: ...


@dataclass
class Candidate:
    provider: str
    model: str


@dataclass
class TaskPolicy:
    candidates: list[Candidate]
    prompt_version: str = "none"
    cache: bool = True


@dataclass
class GatewayStats:
    calls: int = 0
    cache_hits: int = 0
    errors: int = 0
    fallbacks: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    by_model: dict[str, int] = field(default_factory=dict)

    def as_metadata(self, task: str) -> dict[str, float | int]:
        return {
            f"{task}_llm_calls": self.calls, f"{task}_cache_hits": self.cache_hits,
            f"{task}_llm_errors": self.errors, f"{task}_fallbacks": self.fallbacks,
            f"{task}_input_tokens": self.input_tokens, f"{task}_output_tokens": self.output_tokens,
        }


def cache_key(task: str, model: str, prompt_version: str, req: LLMStepRequest) -> str:
    blob = json.dumps([task, model, prompt_version, req.inputs.text, req.inputs.context], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Gateway:
    def __init__(self, db: Database, providers: dict[str, Provider], policies: dict[str, TaskPolicy], *,
                 flow: str, run_id: str | None = None):
        self.db = db
        self.providers = providers
        self.policies = policies
        self.flow = flow
        self.run_id = run_id

    def run(self, task: str, requests: Sequence[LLMStepRequest], output_model: type[LLMOutput] = LLMOutput
            ) -> tuple[list[LLMStepResponse], GatewayStats]:
        policy = self.policies.get(task)
        if policy is None or not policy.candidates:
            raise KeyError(f"no routing policy for task {task!r}; configure one in the LLM gateway resource")
        stats = GatewayStats()
        responses: list[LLMStepResponse | None] = [None] * len(requests)
        ledger: list[dict[str, Any]] = []
        now = utcnow()

        # Guard: nothing unmasked reaches a provider (masking happens at intake; this is the backstop).
        todo: list[int] = []
        for i, r in enumerate(requests):
            leaked = find_unmasked(r.inputs.text)
            if leaked:
                responses[i] = LLMStepResponse(ok=False, error="schema_mismatch",
                                               reason=f"refused: unmasked {', '.join(leaked)} in model input")
            else:
                todo.append(i)

        primary = policy.candidates[0]
        keys = {i: cache_key(task, primary.model, policy.prompt_version, requests[i]) for i in todo}
        if policy.cache and todo:
            hits = self._cache_get(list(keys.values()))
            remaining = []
            for i in todo:
                out = hits.get(keys[i])
                if out is None:
                    remaining.append(i)
                    continue
                responses[i] = LLMStepResponse(ok=True, output=output_model.model_validate(out), reason="cache")
                stats.cache_hits += 1
                ledger.append(self._ledger(task, requests[i].id, primary, policy, ProviderResult(out), True, now))
            todo = remaining

        to_cache: list[dict[str, Any]] = []
        for n, cand in enumerate(policy.candidates):
            if not todo:
                break
            if n > 0:
                stats.fallbacks += len(todo)
            provider = self.providers[cand.provider]
            results = provider.run(task, cand.model, [requests[i] for i in todo])
            failed = []
            for i, res in zip(todo, results):
                stats.calls += 1
                stats.input_tokens += res.input_tokens
                stats.output_tokens += res.output_tokens
                if res.error is None:
                    try:
                        out = output_model.model_validate(res.output)
                    except ValidationError as exc:
                        res = ProviderResult(None, res.input_tokens, res.output_tokens, res.latency_ms,
                                             "schema_mismatch", f"output failed validation ({exc.error_count()} errors)")
                    else:
                        responses[i] = LLMStepResponse(ok=True, output=out, reason=f"{cand.provider}:{cand.model}")
                        stats.by_model[cand.model] = stats.by_model.get(cand.model, 0) + 1
                        if policy.cache and cand == primary:
                            to_cache.append({"key": keys[i], "task": task, "model": cand.model,
                                             "prompt_version": policy.prompt_version,
                                             "output": out.model_dump(mode="json"), "created_at": now})
                ledger.append(self._ledger(task, requests[i].id, cand, policy, res, False, now))
                if res.error is not None:
                    failed.append((i, res))
            todo = [i for i, _ in failed]
            for i, res in failed:
                responses[i] = LLMStepResponse(ok=False, error=res.error, reason=res.reason or res.error)
        stats.errors += sum(1 for r in responses if r is not None and not r.ok)

        with self.db.begin() as conn:
            if ledger:
                conn.execute(llm_calls.insert(), ledger)
            if to_cache:
                self.db.insert_ignore(conn, llm_cache, to_cache, ["key"])
        return [r for r in responses if r is not None], stats

    def _cache_get(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with self.db.begin() as conn:
            for chunk in chunked(keys, 900):
                q = sa.select(llm_cache.c.key, llm_cache.c.output).where(llm_cache.c.key.in_(chunk))
                found.update({k: v for k, v in conn.execute(q).all()})
        return found

    def _ledger(self, task, item_id, cand: Candidate, policy: TaskPolicy, res: ProviderResult, cached: bool, now):
        return {
            "run_id": self.run_id, "flow": self.flow, "item_id": item_id, "task": task, "provider": cand.provider,
            "model": cand.model, "prompt_version": policy.prompt_version,
            "input_tokens": 0 if cached else res.input_tokens, "output_tokens": 0 if cached else res.output_tokens,
            "latency_ms": 0.0 if cached else res.latency_ms, "cached": cached, "ok": res.error is None,
            "error": res.error, "created_at": now,
        }


def estimate_tokens(text: str) -> int:
    """Rough token count (about four characters per token) for providers that report none."""
    return max(1, len(text) // 4)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.ms = (time.perf_counter() - self.t0) * 1000.0
