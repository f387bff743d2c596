"""The LLM gateway against a real HTTP server speaking the OpenAI wire protocol, through the real
openai SDK: fallback, Retry-After, timeouts, circuit breaker, budgets, caches, repair, concurrency."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from orch_project.lib.contracts import LabelledOutput, LLMStepRequest
from orch_project.lib.llm.gateway import Budget, Gateway, ProviderResult
from orch_project.lib.llm.openai_provider import OpenAIProvider
from orch_project.lib.llm.routing import BreakerPolicy, CachePolicy, Candidate, RoutingConfig, TaskPolicy
from orch_project.lib.store import circuit_breakers, llm_calls, token_budgets

from .fake_openai import FakeOpenAI

LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card"]
TEXTS = ["My card was stolen at the station", "When will my new card arrive in the post?",
         "What exchange rate do you use for dollars?", "I lost my card, please block it",
         "Card still has not arrived after two weeks", "Is the exchange rate better at weekends?"]


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI(seed=1) as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.reset()
    yield server
    server.reset()


class EchoLocal:
    """A stand-in embedded provider: answers every item with the first label."""

    name = "local"
    batch = True

    def __init__(self):
        self.seen = 0

    def run(self, task, model, requests, prompt_vars=None):
        self.seen += len(requests)
        return [ProviderResult({"label": LABELS[0], "confidence": 0.5}, 10, 5, 0.1) for _ in requests]


def openai_cand(model: str, price: float = 0.001) -> Candidate:
    return Candidate(provider="openai", model=model, cost_in_per_1k=price, cost_out_per_1k=price * 2,
                     capabilities=("classification",))


def make_gateway(db, srv, candidates, *, concurrency=1, max_retries=0, timeout_s=5.0, breaker=None, budget=None,
                 cache=None, run_id="run-1", local=None, strategy="ordered"):
    routing = RoutingConfig(
        concurrency=concurrency, timeout_s=timeout_s, max_retries=max_retries,
        circuit_breaker=BreakerPolicy(**(breaker or {})),
        tasks={"triage": TaskPolicy(strategy=strategy, candidates=candidates, max_output_tokens=32,
                                    cache=CachePolicy(**(cache or {"exact": False})))})
    providers = {"openai": OpenAIProvider(api_key="sk-test-gateway", base_url=srv.base_url, max_retries=max_retries,
                                          timeout_s=timeout_s)}
    if local is not None:
        providers["local"] = local
    return Gateway(db, providers, routing, flow="test", run_id=run_id, default_provider="openai",
                   prompts={"triage": "Classify the message. Allowed intents: ${allowed_intents}"},
                   prompt_versions={"triage": "p1"}, budget=budget)


def run(gw, texts, prefix="i"):
    reqs = [LLMStepRequest(id=f"{prefix}{n}", inputs={"text": t, "context": {}}) for n, t in enumerate(texts)]
    return gw.run("triage", reqs, LabelledOutput, label_choices=LABELS, prompt_vars={"allowed_intents": ", ".join(LABELS)})


def ledger(db, **where):
    q = sa.select(llm_calls).order_by(llm_calls.c.id)
    for k, v in where.items():
        q = q.where(getattr(llm_calls.c, k) == v)
    with db.begin() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def test_a_truncated_body_is_retried_once_before_it_counts(db, srv):
    srv.configure(script=["malformed", "ok"])
    gw = make_gateway(db, srv, [openai_cand("model-a")])
    responses, stats = run(gw, TEXTS[:1])
    assert responses[0].ok and stats.repairs == 0 and len(srv.requests()) == 2


def test_structured_output_and_usage_through_the_sdk(db, srv):
    gw = make_gateway(db, srv, [openai_cand("model-a")])
    responses, stats = run(gw, TEXTS[:3])
    assert [r.output.label for r in responses] == ["lost_or_stolen_card", "card_arrival", "exchange_rate"]
    body = srv.requests()[0]["body"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    assert body["messages"][1]["content"].startswith("<message>\n")  # inbound text only as delimited data
    rows = ledger(db)
    assert stats.calls == 3 and stats.input_tokens == sum(r["input_tokens"] for r in rows) > 0
    assert all(r["ok"] and r["route_rank"] == 0 and r["output_tokens"] > 0 for r in rows)


def test_fallback_on_500(db, srv):
    srv.configure(model="model-a", rate_500=1.0)
    gw = make_gateway(db, srv, [openai_cand("model-a"), openai_cand("model-b")], max_retries=1)
    responses, stats = run(gw, TEXTS[:3])
    assert all(r.ok and r.reason == "openai:model-b" for r in responses)
    assert len(srv.requests("model-a")) == 3 * 2  # each item: one call + one SDK retry
    assert len(srv.requests("model-b")) == 3
    rows = ledger(db)
    assert [(r["model"], r["ok"], r["error"], r["route_rank"]) for r in rows if r["model"] == "model-a"] == \
        [("model-a", False, "provider_error", 0)] * 3
    assert all(r["ok"] and r["route_rank"] == 1 for r in rows if r["model"] == "model-b")
    assert stats.fallbacks == 3 and stats.errors == 0


def test_retry_after_is_honoured_on_429(db, srv):
    srv.configure(script=["429", "ok"], retry_after_s=1.5)
    gw = make_gateway(db, srv, [openai_cand("model-a")], max_retries=2)
    responses, _ = run(gw, TEXTS[:1])
    assert responses[0].ok
    reqs = srv.requests()
    assert [r["outcome"] for r in reqs] == ["429", "ok"]
    gap = reqs[1]["t"] - reqs[0]["t"]
    assert 1.5 <= gap < 3.0, f"retry came {gap:.2f} s after the 429, Retry-After said 1.5 s"


def test_rate_limited_after_retries_is_classified(db, srv):
    srv.configure(rate_429=1.0, retry_after_s=0.1)
    gw = make_gateway(db, srv, [openai_cand("model-a")], max_retries=1)
    responses, _ = run(gw, TEXTS[:1])
    assert responses[0].error == "rate_limited" and len(srv.requests()) == 2


def test_timeout_is_classified(db, srv):
    srv.configure(rate_hang=1.0, hang_s=3)
    gw = make_gateway(db, srv, [openai_cand("model-a")], timeout_s=0.4)
    responses, _ = run(gw, TEXTS[:1])
    assert responses[0].error == "timeout" and "0.4 s" in responses[0].reason
    assert ledger(db)[0]["error"] == "timeout"


def test_circuit_opens_skips_and_half_opens(db, srv):
    srv.configure(model="model-a", rate_500=1.0)
    breaker = {"failure_threshold": 3, "cooldown_s": 1.0, "half_open_probes": 1}
    cands = [openai_cand("model-a"), openai_cand("model-b")]
    gw = make_gateway(db, srv, cands, breaker=breaker)
    responses, stats = run(gw, TEXTS)
    assert all(r.ok and r.reason == "openai:model-b" for r in responses)
    assert len(srv.requests("model-a")) == 3  # the circuit opened after the third failure
    errors = [r["error"] for r in ledger(db, model="model-a")]
    assert errors == ["provider_error"] * 3 + ["circuit_open"] * 3
    assert stats.circuit_skips == 3
    assert gw.breaker.state("openai:model-a") == "open"

    # another run (another worker, same database) sees the open circuit and skips the provider
    other = make_gateway(db, srv, cands, breaker=breaker, run_id="run-2")
    run(other, TEXTS[:2], prefix="j")
    assert len(srv.requests("model-a")) == 3

    # after the cool-down one probe goes through; still failing -> open again, the rest skip
    time.sleep(1.1)
    run(other, TEXTS[:2], prefix="k")
    assert len(srv.requests("model-a")) == 4
    assert other.breaker.state("openai:model-a") == "open"

    # after the next cool-down the provider has recovered: the probe succeeds and closes the circuit
    srv.reset()
    time.sleep(1.1)
    responses, _ = run(other, TEXTS[:3], prefix="m")
    assert [r.reason for r in responses] == ["openai:model-a"] * 3
    with db.begin() as conn:
        row = conn.execute(sa.select(circuit_breakers).where(circuit_breakers.c.key == "openai:model-a")).first()
    assert row.state == "closed" and row.failures == 0


def test_budget_exhaustion_falls_back_and_ledger_adds_up(db, srv):
    local = EchoLocal()
    cands = [openai_cand("model-a"), Candidate(provider="local", model="echo", capabilities=("classification",))]
    # each call reserves estimate(prompt) + 32 output tokens; 150 tokens fit two calls, not three
    gw = make_gateway(db, srv, cands, local=local, budget=Budget(max_tokens_per_run=150, daily_token_cap=10**9))
    responses, stats = run(gw, TEXTS)
    assert all(r.ok for r in responses)
    paid = [r for r in ledger(db) if r["provider"] == "openai"]
    ok_paid = [r for r in paid if r["ok"]]
    refused = [r for r in paid if r["error"] == "quota_exceeded"]
    assert len(ok_paid) == 2 and len(refused) == 4 and local.seen == 4
    assert len(srv.requests()) == 2  # refused reservations never reach the provider
    with db.begin() as conn:
        run_row = conn.execute(sa.select(token_budgets).where(token_budgets.c.scope == "run:run-1")).first()
    used = sum(r["input_tokens"] + r["output_tokens"] for r in ok_paid)
    assert run_row.used == used <= run_row.cap == 150
    assert run_row.reserved == 0 and run_row.refused == 4
    assert run_row.cost_usd == pytest.approx(sum(r["cost_usd"] for r in paid))
    assert sum(r["reserved_tokens"] for r in ok_paid) >= used  # estimates were an upper bound
    assert stats.budget_refusals == 4 and stats.fallbacks == 4


def test_budget_exhaustion_without_fallback_defers(db, srv):
    gw = make_gateway(db, srv, [openai_cand("model-a")], budget=Budget(max_tokens_per_run=10**9, daily_token_cap=80))
    responses, _ = run(gw, TEXTS[:3])
    assert [r.ok for r in responses] == [True, False, False]
    assert {r.error for r in responses[1:]} == {"quota_exceeded"}
    assert "day:test:" in responses[1].reason and "cap 80" in responses[1].reason


def test_exact_and_semantic_cache_hits_make_no_http_calls(db, srv):
    gw = make_gateway(db, srv, [openai_cand("model-a")],
                      cache={"exact": True, "semantic": True, "semantic_threshold": 0.9})
    first, stats1 = run(gw, TEXTS[:3])
    assert len(srv.requests()) == 3 and stats1.cache_hits == 0

    again, stats2 = run(gw, TEXTS[:3], prefix="again")
    assert len(srv.requests()) == 3, "exact cache hits must not call the provider"
    assert stats2.cache_hits == 3 and [r.output.label for r in again] == [r.output.label for r in first]

    near = ["my card was stolen at the station!!", "Something entirely different about interest on savings"]
    answers, stats3 = run(gw, near, prefix="near")
    assert stats3.semantic_cache_hits == 1 and answers[0].reason == "cache:semantic"
    assert answers[0].output.label == first[0].output.label
    assert len(srv.requests()) == 4  # only the unrelated message reached the server
    kinds = [r["cache_kind"] for r in ledger(db) if r["cached"]]
    assert kinds == ["exact"] * 3 + ["semantic"]


def test_repair_attempt_on_schema_mismatch(db, srv):
    srv.configure(script=["schema", "ok"])
    gw = make_gateway(db, srv, [openai_cand("model-a")])
    responses, stats = run(gw, TEXTS[:1])
    assert responses[0].ok and stats.repairs == 1
    second = srv.requests()[1]["body"]["messages"]
    assert second[-2] == {"role": "assistant", "content": '{"label": 12345, "confidence": 7.5}'}
    assert second[-1]["content"].startswith("Your answer was rejected: output failed validation")
    assert [r["repair"] for r in ledger(db)] == [False, True]


def test_malformed_json_after_repair_is_a_schema_mismatch_with_the_raw_reason(db, srv):
    srv.configure(script=["malformed", "malformed", "truncated"])  # the body is retried once, then repair
    local = EchoLocal()
    cands = [openai_cand("model-a"), Candidate(provider="local", model="echo", capabilities=("classification",))]
    gw = make_gateway(db, srv, cands, local=local)
    responses, _ = run(gw, TEXTS[:1])
    r = responses[0]
    assert not r.ok and r.error == "schema_mismatch" and local.seen == 0  # no silent fallback on bad content
    assert r.reason.startswith("malformed JSON response body (after 1 retry): ")
    assert [q["outcome"] for q in srv.requests()] == ["malformed", "malformed", "truncated"]
    assert "after one repair attempt: content is not valid JSON" in r.reason


def test_unmasked_input_never_leaves_the_process(db, srv):
    gw = make_gateway(db, srv, [openai_cand("model-a")])
    responses, _ = run(gw, ["reach me at jane.doe@example.com about my card"])
    assert responses[0].error == "schema_mismatch" and "EMAIL_ADDRESS" in responses[0].reason
    assert srv.requests() == []


def test_calls_run_concurrently_up_to_the_limit(db, srv):
    srv.configure(latency_ms=200)
    gw = make_gateway(db, srv, [openai_cand("model-a")], concurrency=8)
    responses, _ = run(gw, [f"{t} ({n})" for n in range(4) for t in TEXTS][:24])
    assert all(r.ok for r in responses)
    assert srv.peak_in_flight == 8
