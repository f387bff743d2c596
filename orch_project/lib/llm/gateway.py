"""The one way a step reaches a model.

A step hands over a batch: its task, the requests (masked text + context) and the pydantic model
its output must satisfy. For each item the gateway

1. refuses input that still carries an unmasked PII pattern (masking happens at intake; this is
   the backstop),
2. answers from the exact cache, then from the semantic cache where the task opted in,
3. ranks the task's candidates (router: default provider first, healthy before open circuits,
   within the latency budget, then config order or expected cost),
4. calls the best candidate: the circuit breaker must allow it, a paid call must reserve its token
   estimate in the run and day budgets, the output must validate (one repair attempt with the
   validation error fed back), and every attempt is written to the ledger with its routing reason,
   tokens and cost in the same transaction that settles the reservation,
5. falls back to the next candidate on any error except a schema mismatch that survived repair,

and returns the LLM step contract response per item: ok + output, or a contract error
(timeout, quota_exceeded, schema_mismatch, rate_limited, provider_error, circuit_open) with the
reason. A per-item failure never fails the batch. HTTP calls of a batch run concurrently up to
the routing config's ``concurrency``.
"""

from __future__ import annotations

import string
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import sqlalchemy as sa
from pydantic import ValidationError

from ..contracts import Budget, LabelledOutput, LLMOutput, LLMStepRequest, LLMStepResponse, describe_validation_error
from ..guardrails.pii import find_unmasked
from ..store import Database, llm_calls, utcnow
from . import cache
from .controls import BudgetRefused, CircuitBreaker, Reservation, TokenBudget
from .routing import Candidate, RoutingConfig, TaskPolicy, rank

FALLBACK_ERRORS = {"timeout", "quota_exceeded", "rate_limited", "provider_error", "circuit_open"}


@dataclass
class ProviderResult:
    output: dict[str, Any] | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None  # one of the contract's error classes
    reason: str = ""
    raw: str | None = None  # the provider's raw content, for a repair attempt


class BatchProvider(Protocol):
    """A provider that answers a whole batch in-process (the embedded one)."""

    name: str
    batch: bool

    def run(self, task: str, model: str, requests: Sequence[LLMStepRequest],
            prompt_vars: dict[str, Any]) -> list[ProviderResult]: ...


class CallProvider(Protocol):
    """A provider called once per item over the network (OpenAI-compatible)."""

    name: str
    batch: bool

    def call(self, *, model: str, messages: list[dict[str, str]], schema_name: str, schema: dict[str, Any],
             max_tokens: int, timeout_s: float | None = None) -> ProviderResult: ...


@dataclass
class GatewayStats:
    calls: int = 0
    cache_hits: int = 0
    semantic_cache_hits: int = 0
    errors: int = 0
    fallbacks: int = 0
    repairs: int = 0
    circuit_skips: int = 0
    budget_refusals: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_call(self, res: ProviderResult, cost: float) -> None:
        with self._lock:
            self.calls += 1
            self.input_tokens += res.input_tokens
            self.output_tokens += res.output_tokens
            self.cost_usd += cost

    def merge(self, other: "GatewayStats") -> "GatewayStats":
        """Sum of two batches' figures (e.g. the arms of an A/B test)."""
        out = GatewayStats()
        for f in fields(GatewayStats):
            if not f.name.startswith("_"):
                setattr(out, f.name, getattr(self, f.name) + getattr(other, f.name))
        return out

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def as_metadata(self, task: str) -> dict[str, float | int]:
        """Numeric per-run figures (Dagster charts numeric metadata over time)."""
        return {
            f"{task}_llm_calls": self.calls, f"{task}_cache_hits": self.cache_hits,
            f"{task}_semantic_cache_hits": self.semantic_cache_hits, f"{task}_llm_errors": self.errors,
            f"{task}_fallbacks": self.fallbacks, f"{task}_repairs": self.repairs,
            f"{task}_circuit_skips": self.circuit_skips, f"{task}_budget_refusals": self.budget_refusals,
            f"{task}_input_tokens": self.input_tokens, f"{task}_output_tokens": self.output_tokens,
            f"{task}_cost_usd": round(self.cost_usd, 6),
        }


def estimate_tokens(text: str) -> int:
    """A deliberately high token estimate (three characters per token) for reservations and for
    providers that report none; reservations are reconciled with reported usage afterwards."""
    return max(1, len(text) // 3 + 1)


def delimit(text: str) -> str:
    """Inbound text enters a prompt only as delimited data; it cannot close the delimiter."""
    cleaned = text.replace("<message>", "[message]").replace("</message>", "[/message]")
    return f"<message>\n{cleaned}\n</message>"


class Gateway:
    def __init__(self, db: Database, providers: dict[str, BatchProvider | CallProvider], routing: RoutingConfig,
                 *, flow: str, run_id: str | None = None, default_provider: str = "local",
                 prompts: dict[str, str] | None = None, prompt_versions: dict[str, str] | None = None,
                 budget: Budget | None = None):
        self.db = db
        self.providers = providers
        self.routing = routing
        self.flow = flow
        self.run_id = run_id
        self.default_provider = default_provider
        self.prompts = prompts or {}
        self.prompt_versions = prompt_versions or {}
        self.budget_caps = budget
        self.breaker = CircuitBreaker(db, routing.circuit_breaker)
        self._budget: TokenBudget | None = None

    # -- public ----------------------------------------------------------------------
    def run(self, task: str, requests: Sequence[LLMStepRequest], output_model: type[LLMOutput] = LabelledOutput, *,
            prompt_vars: dict[str, Any] | None = None, label_choices: Sequence[str] | None = None,
            variant: str | None = None) -> tuple[list[LLMStepResponse], GatewayStats]:
        """``variant`` selects an A/B prompt variant (prompts/<task>.<variant>.txt): routed by the task's
        policy, cached, ledgered and versioned as ``<task>.<variant>``."""
        policy = self.routing.tasks.get(task)
        if policy is None or not policy.candidates:
            raise KeyError(f"no routing policy for task {task!r}: add it to the flow's routing.yaml")
        prompt_id = f"{task}.{variant}" if variant else task
        call = _Call(self, prompt_id, policy, output_model, dict(prompt_vars or {}), list(label_choices or []))
        return call.execute(list(requests))

    def budget(self) -> TokenBudget:
        if self._budget is None:
            caps = self.budget_caps or Budget(max_tokens_per_run=10**12, daily_token_cap=10**12)
            self._budget = TokenBudget(self.db, flow=self.flow, run_id=self.run_id,
                                       max_tokens_per_run=caps.max_tokens_per_run,
                                       daily_token_cap=caps.daily_token_cap)
        return self._budget

    def observed_p50_ms(self, keys: list[str], window: int = 200) -> dict[str, float]:
        out = {}
        with self.db.begin() as conn:
            for key in keys:
                provider, model = key.split(":", 1)
                q = (sa.select(llm_calls.c.latency_ms).where(
                    llm_calls.c.provider == provider, llm_calls.c.model == model, llm_calls.c.ok.is_(True),
                    llm_calls.c.cached.is_(False)).order_by(llm_calls.c.created_at.desc()).limit(window))
                vals = sorted(v for (v,) in conn.execute(q).all())
                if vals:
                    out[key] = vals[len(vals) // 2]
        return out


class _Call:
    """One ``Gateway.run``: the state of a batch as it moves through caches and candidates."""

    def __init__(self, gw: Gateway, task: str, policy: TaskPolicy, output_model: type[LLMOutput],
                 prompt_vars: dict[str, Any], label_choices: list[str]):
        self.gw = gw
        self.task = task
        self.policy = policy
        self.output_model = output_model
        self.prompt_vars = prompt_vars
        self.label_choices = label_choices
        self.version = gw.prompt_versions.get(task, "none")
        self.stats = GatewayStats()
        self.now = utcnow()
        self.day = self.now.date().isoformat()
        self.to_cache: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._schema_cache: dict[str, Any] | None = None
        self._prereserved: dict[int, Any] = {}

    # -- the batch -------------------------------------------------------------------
    def execute(self, requests: list[LLMStepRequest]) -> tuple[list[LLMStepResponse], GatewayStats]:
        self.requests = requests
        responses: list[LLMStepResponse | None] = [None] * len(requests)
        todo = []
        for i, r in enumerate(requests):
            leaked = find_unmasked(r.inputs.text)
            if leaked:
                responses[i] = LLMStepResponse(ok=False, error="schema_mismatch",
                                               reason=f"refused: unmasked {', '.join(leaked)} in model input")
            else:
                todo.append(i)
        if not todo:
            self._finish(responses, [])
            return [r for r in responses if r is not None], self.stats

        keys = [c.key for c in self.policy.candidates]
        self.est_in = {i: estimate_tokens(self._system(requests[i]) + requests[i].inputs.text) for i in todo}
        typical = sorted(self.est_in.values())[len(todo) // 2]
        self.ranked = rank(self.policy, default_provider=self.gw.default_provider, est_input_tokens=typical,
                           open_circuits=self.gw.breaker.open_keys(keys),
                           observed_p50_ms=self.gw.observed_p50_ms(keys))
        if not self.ranked:
            raise KeyError(f"no candidate of task {self.task!r} has the capabilities {self.policy.requires}")

        ledger: list[dict[str, Any]] = []
        todo = self._from_cache(todo, responses, ledger)
        position = {i: 0 for i in todo}
        while position:
            groups: dict[int, list[int]] = {}
            for i, p in position.items():
                groups.setdefault(p, []).append(i)
            for p, idx in sorted(groups.items()):
                ranked = self.ranked[p]
                provider = self.gw.providers.get(ranked.candidate.provider)
                if provider is None:
                    results = {i: (ProviderResult(error="provider_error",
                                                  reason=f"provider {ranked.candidate.provider!r} is not configured"),
                                   None) for i in idx}
                elif getattr(provider, "batch", False):
                    results = self._batch(provider, ranked, idx, ledger)
                else:
                    results = self._concurrent(provider, ranked, idx)
                for i, (res, out) in results.items():
                    if out is not None:
                        responses[i] = LLMStepResponse(ok=True, output=out, reason=ranked.candidate.key)
                        del position[i]
                    elif res.error in FALLBACK_ERRORS and p + 1 < len(self.ranked):
                        position[i] = p + 1
                        self.stats.count("fallbacks")
                    else:
                        responses[i] = LLMStepResponse(ok=False, error=res.error or "provider_error",
                                                       reason=res.reason or res.error or "failed")
                        del position[i]
        self._finish(responses, ledger)
        return [r for r in responses if r is not None], self.stats

    def _finish(self, responses, ledger) -> None:
        for r in responses:
            if r is not None and not r.ok:
                self.stats.errors += 1
        with self.gw.db.begin() as conn:
            if ledger:
                conn.execute(llm_calls.insert(), ledger)
            if self.to_cache:
                cache.put(self.gw.db, conn, self.to_cache)

    # -- caches ----------------------------------------------------------------------
    def _from_cache(self, todo: list[int], responses, ledger) -> list[int]:
        pol = self.policy.cache
        if not (pol.exact or pol.semantic):
            return todo
        models = [r.candidate for r in self.ranked]
        remaining = todo
        if pol.exact:
            keys = {(i, c.key): cache.cache_key(self.task, c.model, self.version, self.requests[i])
                    for i in todo for c in models}
            hits = cache.exact_get(self.gw.db, list(keys.values()))
            remaining = []
            for i in todo:
                found = next(((c, hits[keys[(i, c.key)]]) for c in models if keys[(i, c.key)] in hits), None)
                if found is None or not self._cached_response(i, found[1], found[0], "exact", responses, ledger):
                    remaining.append(i)
        if pol.semantic and remaining:
            texts = [self.requests[i].inputs.text for i in remaining]
            found = cache.semantic_get(self.gw.db, task=self.task, models=[c.model for c in models],
                                       prompt_version=self.version, texts=texts, threshold=pol.semantic_threshold)
            still = []
            by_model = {c.model: c for c in models}
            for i, hit in zip(remaining, found):
                if hit is None or not self._cached_response(i, hit[0], by_model[hit[2]], "semantic", responses,
                                                            ledger, note=f"similarity {hit[1]:.3f}"):
                    still.append(i)
            remaining = still
        return remaining

    def _cached_response(self, i, output, cand: Candidate, kind: str, responses, ledger, note: str = "") -> bool:
        out, _ = self._validate(output)
        if out is None:
            return False  # a cached answer that no longer satisfies the contract is ignored
        responses[i] = LLMStepResponse(ok=True, output=out, reason=f"cache:{kind}")
        self.stats.count("cache_hits")
        if kind == "semantic":
            self.stats.count("semantic_cache_hits")
        ledger.append(self._row(i, cand, 0, ProviderResult(output), f"cache {kind} {note}".strip(), cache_kind=kind))
        return True

    # -- providers -------------------------------------------------------------------
    def _batch(self, provider, ranked, idx: list[int], ledger) -> dict[int, tuple[ProviderResult, LLMOutput | None]]:
        cand = ranked.candidate
        if not self.gw.breaker.allow(cand.key):
            self.stats.count("circuit_skips", len(idx))
            res = ProviderResult(error="circuit_open", reason=f"circuit open for {cand.key}")
            ledger.extend(self._row(i, cand, ranked.rank, res, "skipped: circuit open") for i in idx)
            return {i: (res, None) for i in idx}
        results = provider.run(self.task, cand.model, [self.requests[i] for i in idx], self.prompt_vars)
        out: dict[int, tuple[ProviderResult, LLMOutput | None]] = {}
        health = None
        for i, res in zip(idx, results):
            validated = None
            if res.error is None:
                validated, problem = self._validate(res.output)
                if validated is None:
                    res = ProviderResult(None, res.input_tokens, res.output_tokens, res.latency_ms,
                                         "schema_mismatch", problem)
            if res.error and health is None:
                health = res
            cost = cand.cost(res.input_tokens, res.output_tokens)
            self.stats.add_call(res, cost)
            ledger.append(self._row(i, cand, ranked.rank, res, ranked.reason, cost=cost))
            if validated is not None:
                self._remember(i, cand, validated)
            out[i] = (res, validated)
        self.gw.breaker.record(cand.key, health.error if health else None, health.reason if health else "")
        return out

    def _concurrent(self, provider, ranked, idx: list[int]) -> dict[int, tuple[ProviderResult, LLMOutput | None]]:
        self._reserve_block(ranked.candidate, idx)
        try:
            workers = max(1, min(self.gw.routing.concurrency, len(idx)))
            if workers == 1:
                return {i: self._one(provider, ranked, i) for i in idx}
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"llm-{self.task}") as pool:
                futures = {i: pool.submit(self._one, provider, ranked, i) for i in idx}
                return {i: f.result() for i, f in futures.items()}
        finally:
            self._release_block()

    def _reserve_block(self, cand: Candidate, idx: list[int]) -> None:
        """Reserve the whole wave's estimates in one transaction when the budgets allow it; each call
        then settles its own share (ledger row + settlement, one write per call). If the block does
        not fit, every call reserves for itself and the budget decides call by call."""
        self._prereserved: dict[int, Reservation] = {}
        if not cand.metered or len(idx) < 2:
            return
        shares = {i: self.est_in[i] + self.policy.max_output_tokens for i in idx}
        try:
            block = self.gw.budget().reserve(sum(shares.values()), count_refusal=False)
        except BudgetRefused:
            return
        self._prereserved = {i: Reservation(block.scopes, t) for i, t in shares.items()}

    def _release_block(self) -> None:
        """Give back the shares of calls that never happened (open circuit, an exception)."""
        left, self._prereserved = self._prereserved, {}
        if left:
            with self.gw.db.write() as conn:
                for r in left.values():
                    self.gw.budget().settle(conn, r, 0, 0.0)

    def _one(self, provider, ranked, i: int) -> tuple[ProviderResult, LLMOutput | None]:
        """One item on one HTTP candidate: breaker, budget, call, validation, one repair."""
        req = self.requests[i]
        messages = [{"role": "system", "content": self._system(req)},
                    {"role": "user", "content": delimit(req.inputs.text)}]
        res, out = self._attempt(provider, ranked, i, messages, repair=False)
        if res.error == "schema_mismatch":
            self.stats.count("repairs")
            fix = list(messages)
            if res.raw:
                fix.append({"role": "assistant", "content": res.raw[:4000]})
            fix.append({"role": "user", "content": f"Your answer was rejected: {res.reason}. Reply again with "
                        "only a JSON object that satisfies the response schema."})
            first = res.reason
            res, out = self._attempt(provider, ranked, i, fix, repair=True)
            if res.error == "schema_mismatch":
                res.reason = f"{first}; after one repair attempt: {res.reason}"
        return res, out

    def _attempt(self, provider, ranked, i, messages, *, repair: bool) -> tuple[ProviderResult, LLMOutput | None]:
        cand = ranked.candidate
        why = ("repair: " if repair else "") + ranked.reason
        if not self.gw.breaker.allow(cand.key):
            self.stats.count("circuit_skips")
            res = ProviderResult(error="circuit_open", reason=f"circuit open for {cand.key}")
            self._write(self._row(i, cand, ranked.rank, res, "skipped: circuit open", repair=repair))
            return res, None
        reservation = None if repair else self._prereserved.pop(i, None)
        if cand.metered and reservation is None:
            estimate = self.est_in[i] + self.policy.max_output_tokens
            try:
                reservation = self.gw.budget().reserve(estimate)
            except BudgetRefused as exc:
                self.stats.count("budget_refusals")
                res = ProviderResult(error="quota_exceeded", reason=str(exc))
                self._write(self._row(i, cand, ranked.rank, res, f"refused: {exc}", repair=repair))
                return res, None
        res = provider.call(model=cand.model, messages=messages, schema_name=self.task.replace(".", "_"),
                            schema=self._schema(),
                            max_tokens=self.policy.max_output_tokens, timeout_s=self.policy.timeout_s)
        out = None
        if res.error is None:
            out, problem = self._validate(res.output)
            if out is None:
                res.error, res.reason = "schema_mismatch", problem
        self.gw.breaker.record(cand.key, res.error, res.reason)
        cost = cand.cost(res.input_tokens, res.output_tokens)
        self.stats.add_call(res, cost)
        row = self._row(i, cand, ranked.rank, res, why, cost=cost, repair=repair,
                        reserved=reservation.tokens if reservation else 0)
        with self.gw.db.write() as conn:  # ledger row and budget settlement commit together
            conn.execute(llm_calls.insert(), [row])
            if reservation is not None:
                self.gw.budget().settle(conn, reservation, res.input_tokens + res.output_tokens, cost)
        if out is not None:
            self._remember(i, cand, out)
        return res, out

    # -- helpers ---------------------------------------------------------------------
    def _system(self, req: LLMStepRequest) -> str:
        tpl = self.gw.prompts.get(self.task)
        if not tpl:
            return ""
        values = {k: v for k, v in req.inputs.context.items() if isinstance(v, (str, int, float))}
        values.update(self.prompt_vars)
        return string.Template(tpl).safe_substitute(values)

    def _schema(self) -> dict[str, Any]:
        if self._schema_cache is None:  # building a JSON Schema is slow: once per batch
            schema = self.output_model.model_json_schema()
            if self.label_choices:
                schema.setdefault("properties", {}).setdefault("label", {})["enum"] = self.label_choices
            self._schema_cache = schema
        return self._schema_cache

    def _validate(self, output) -> tuple[LLMOutput | None, str]:
        try:
            out = self.output_model.model_validate(output)
        except ValidationError as exc:
            return None, f"output failed validation: {describe_validation_error(exc)}"
        label = getattr(out, "label", None)
        if self.label_choices and label not in self.label_choices:
            return None, f"label {str(label)[:60]!r} is not one of the {len(self.label_choices)} allowed labels"
        return out, ""

    def _remember(self, i: int, cand: Candidate, out: LLMOutput) -> None:
        pol = self.policy.cache
        if not (pol.exact or pol.semantic):
            return
        req = self.requests[i]
        with self._lock:
            self.to_cache.append({
                "key": cache.cache_key(self.task, cand.model, self.version, req), "task": self.task,
                "model": cand.model, "prompt_version": self.version, "output": out.model_dump(mode="json"),
                "created_at": self.now, "input_text": req.inputs.text if pol.semantic else None})

    def _row(self, i, cand: Candidate, route_rank: int, res: ProviderResult, reason: str, *, cost: float = 0.0,
             repair: bool = False, reserved: int = 0, cache_kind: str | None = None) -> dict[str, Any]:
        cached = cache_kind is not None
        return {
            "run_id": self.gw.run_id, "flow": self.gw.flow, "item_id": self.requests[i].id, "task": self.task,
            "provider": cand.provider, "model": cand.model, "prompt_version": self.version,
            "input_tokens": 0 if cached else res.input_tokens, "output_tokens": 0 if cached else res.output_tokens,
            "latency_ms": 0.0 if cached else res.latency_ms, "cached": cached, "cache_kind": cache_kind,
            "ok": res.error is None, "error": res.error, "created_at": utcnow(), "route_rank": route_rank,
            "route_reason": reason[:255], "repair": repair, "reserved_tokens": reserved, "cost_usd": cost,
            "day": self.day,
        }

    def _write(self, row: dict[str, Any]) -> None:
        with self.gw.db.write() as conn:
            conn.execute(llm_calls.insert(), [row])

