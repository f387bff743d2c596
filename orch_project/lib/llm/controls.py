"""Shared state that protects the model providers and the wallet, kept in the app database so that
every run, every worker and every process sees the same picture:

- ``CircuitBreaker``: per provider+model, closed -> open after N consecutive failures -> half-open
  after a cool-down (a limited number of probe calls) -> closed on success / open again on failure.
- ``TokenBudget``: the brief's per-run and per-day token caps. A call reserves its estimate in both
  scopes atomically (a conditional UPDATE, so concurrent workers can never overrun), and settles
  with the provider's reported usage afterwards; refusals are counted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa

from ..store import Database, as_utc, circuit_breakers, token_budgets, utcnow
from .routing import BreakerPolicy

# Errors that say something about the provider's health (content problems do not).
HEALTH_ERRORS = {"provider_error", "timeout", "rate_limited"}


class CircuitBreaker:
    """State lives in the app database. A process remembers "closed, no failures" for up to
    ``refresh_s`` so the healthy path costs no database round trip per call; a circuit opened by
    another process is therefore seen within that many seconds, one opened here at once."""

    def __init__(self, db: Database, policy: BreakerPolicy, *, refresh_s: float = 1.0):
        self.db = db
        self.policy = policy
        self.refresh_s = refresh_s
        self._healthy: dict[str, float] = {}  # key -> monotonic time it was last seen closed with 0 failures
        self._failures_seen: dict[str, int] = {}  # key -> failures recorded by this process (a generation)
        self._lock = threading.Lock()

    def _known_healthy(self, key: str) -> bool:
        with self._lock:
            seen = self._healthy.get(key)
            return seen is not None and time.monotonic() - seen < self.refresh_s

    def _generation(self, key: str) -> int:
        with self._lock:
            return self._failures_seen.get(key, 0)

    def _mark(self, key: str, healthy: bool, generation: int | None = None) -> None:
        """Remember (or forget) "closed with no failures". A healthy mark based on a read made
        before a failure was recorded by another thread (``generation`` changed) is dropped."""
        with self._lock:
            if not healthy:
                self._healthy.pop(key, None)
                self._failures_seen[key] = self._failures_seen.get(key, 0) + 1
            elif generation is None or generation == self._failures_seen.get(key, 0):
                self._healthy[key] = time.monotonic()

    def open_keys(self, keys: list[str]) -> set[str]:
        """Keys whose circuit is open and still cooling down (for the router's ranking)."""
        if not keys:
            return set()
        cutoff = utcnow() - timedelta(seconds=self.policy.cooldown_s)
        q = sa.select(circuit_breakers.c.key, circuit_breakers.c.opened_at).where(
            circuit_breakers.c.key.in_(keys), circuit_breakers.c.state == "open")
        with self.db.begin() as conn:
            return {k for k, opened in conn.execute(q).all() if as_utc(opened) > cutoff}

    def state(self, key: str) -> str:
        with self.db.begin() as conn:
            s = conn.execute(sa.select(circuit_breakers.c.state).where(circuit_breakers.c.key == key)).scalar()
        return s or "closed"

    def allow(self, key: str) -> bool:
        """May a call go to ``key`` now? Open -> refused until the cool-down ends, then half-open
        lets ``half_open_probes`` calls through (claimed atomically across workers)."""
        if self._known_healthy(key):
            return True
        t = circuit_breakers.c
        generation = self._generation(key)
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t.state, t.failures).where(t.key == key)).first()
        if row is None or row.state == "closed":
            if row is None or row.failures == 0:
                self._mark(key, True, generation)
            return True
        with self.db.write() as conn:
            row = conn.execute(sa.select(t.state, t.opened_at).where(t.key == key)).first()
            if row is None or row.state == "closed":
                return True
            now = utcnow()
            if row.state == "open":
                if as_utc(row.opened_at) + timedelta(seconds=self.policy.cooldown_s) > now:
                    return False
                conn.execute(circuit_breakers.update().where(t.key == key, t.state == "open",
                                                             t.opened_at == row.opened_at)
                             .values(state="half_open", probes=0, updated_at=now))
            claimed = conn.execute(circuit_breakers.update().where(
                t.key == key, t.state == "half_open", t.probes < self.policy.half_open_probes)
                .values(probes=t.probes + 1, updated_at=now))
            return claimed.rowcount == 1

    def record(self, key: str, error: str | None, reason: str = "") -> str:
        """Feed one call's outcome back; returns the state after it."""
        t = circuit_breakers.c
        healthy = error is None or error not in HEALTH_ERRORS
        if healthy and self._known_healthy(key):
            return "closed"
        now = utcnow()
        generation = self._generation(key)
        if not healthy:
            self._mark(key, False)
        with self.db.write() as conn:
            row = conn.execute(sa.select(t.state, t.failures).where(t.key == key)).first()
            if healthy:
                if row is not None and (row.state != "closed" or row.failures):
                    conn.execute(circuit_breakers.update().where(t.key == key).values(
                        state="closed", failures=0, probes=0, opened_at=None, updated_at=now))
                self._mark(key, True, generation)
                return "closed"
            if row is None:
                self.db.insert_ignore(conn, circuit_breakers, [{"key": key, "state": "closed", "failures": 0,
                                                                "probes": 0, "updated_at": now}], ["key"])
                row = conn.execute(sa.select(t.state, t.failures).where(t.key == key)).first()
            failures = row.failures + 1
            opens = row.state == "half_open" or failures >= self.policy.failure_threshold
            values = {"failures": failures, "last_error": f"{error}: {reason}"[:255], "updated_at": now}
            if opens and row.state != "open":
                values.update(state="open", opened_at=now, probes=0)
            conn.execute(circuit_breakers.update().where(t.key == key).values(**values))
            return values.get("state", row.state)


@dataclass
class Reservation:
    scopes: tuple[str, ...]
    tokens: int


class BudgetRefused(Exception):
    def __init__(self, scope: str, cap: int):
        super().__init__(f"token budget {scope} (cap {cap}) would be exceeded")
        self.scope = scope
        self.cap = cap


class TokenBudget:
    """Caps from the brief, per run and per UTC day for the flow."""

    def __init__(self, db: Database, *, flow: str, run_id: str | None, max_tokens_per_run: int,
                 daily_token_cap: int):
        self.db = db
        self.caps = {f"day:{flow}:{utcnow().date().isoformat()}": int(daily_token_cap)}
        if run_id:
            self.caps[f"run:{run_id}"] = int(max_tokens_per_run)
        now = utcnow()
        with db.begin() as conn:
            db.insert_ignore(conn, token_budgets, [{"scope": s, "cap": c, "used": 0, "reserved": 0, "refused": 0,
                                                   "cost_usd": 0.0, "updated_at": now}
                                                  for s, c in self.caps.items()], ["scope"])
            for s, c in self.caps.items():  # the brief may have changed since the row was made
                conn.execute(token_budgets.update().where(token_budgets.c.scope == s, token_budgets.c.cap != c)
                             .values(cap=c, updated_at=now))

    def reserve(self, tokens: int, *, count_refusal: bool = True) -> Reservation:
        """Reserve ``tokens`` in every scope or in none; raises BudgetRefused naming the scope."""
        t = token_budgets.c
        try:
            with self.db.write() as conn:
                for scope in self.caps:
                    res = conn.execute(token_budgets.update().where(
                        t.scope == scope, t.used + t.reserved + tokens <= t.cap)
                        .values(reserved=t.reserved + tokens, updated_at=utcnow()))
                    if res.rowcount != 1:
                        raise BudgetRefused(scope, self.caps[scope])
        except BudgetRefused as refused:
            if not count_refusal:
                raise
            with self.db.write() as conn:
                conn.execute(token_budgets.update().where(t.scope == refused.scope)
                             .values(refused=t.refused + 1, updated_at=utcnow()))
            raise
        return Reservation(tuple(self.caps), tokens)

    def settle(self, conn, reservation: Reservation, used_tokens: int, cost_usd: float) -> None:
        """Replace the estimate by the reported usage (inside the caller's ledger transaction)."""
        t = token_budgets.c
        conn.execute(token_budgets.update().where(t.scope.in_(reservation.scopes)).values(
            reserved=t.reserved - reservation.tokens, used=t.used + used_tokens, cost_usd=t.cost_usd + cost_usd,
            updated_at=utcnow()))
