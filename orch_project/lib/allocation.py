"""Budget re-allocation across channels by Thompson sampling, with guardrails (plain Python + numpy).

The evidence is what each channel bought: conversions for spend, per period. Each channel's conversions per
unit of spend has a Gamma posterior (the conjugate of a Poisson count for a known spend): prior
``Gamma(prior_conversions, prior_spend)`` (weak: the pooled rate, worth ``prior_weight`` of spend), updated
with every period's conversions and spend, older periods discounted by ``decay`` per period (channels
drift). Next period's allocation is the average, over ``samples`` draws of the channels' rates, of the best
allocation for that draw under the guardrails: a channel with a high chance of being the best gets most of
the movable money, one that is probably worse keeps only what the guardrails protect, and a channel we know
little about keeps being tried (its draws are wide) -- exploration without a separate explore phase.

Guardrails (every allocation, every draw):
- ``min_share``: every channel keeps at least this share of the budget (so every channel keeps producing
  evidence and no channel is switched off by one bad period);
- ``max_shift``: each channel moves by at most this share of the budget from its previous amount (no
  whiplash; the previous allocation defaults to the last period's spend, scaled to the new budget).
The allocation sums to the budget (rounded to cents, the remainder to the largest channel).

``reallocate`` also says why: per channel the posterior mean rate (conversions per 1,000 spent) with a 90 %
interval, the probability it is the best channel, the change from the previous amount and which guardrail
capped it; ``expected_conversions`` is the allocation times the posterior mean rates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Guardrails:
    min_share: float = 0.05
    max_shift: float = 0.15
    decay: float = 0.9
    prior_weight: float = 0.25  # the prior is worth this share of the average channel's spend
    samples: int = 2000

    def __post_init__(self) -> None:
        if not 0 <= self.min_share < 1 or not 0 < self.max_shift <= 1 or not 0 < self.decay <= 1:
            raise ValueError("min_share in [0, 1), max_shift in (0, 1], decay in (0, 1]")


@dataclass
class Allocation:
    allocation: dict[str, float]
    expected_conversions: float
    reasons: dict[str, str]
    detail: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"allocation": self.allocation, "expected_conversions": round(self.expected_conversions, 2),
                "reasons": self.reasons}


class AllocationError(ValueError):
    """Evidence or settings the allocator cannot use; the message says what to change."""


def posterior(rows: Sequence[Mapping[str, Any]], channels: Sequence[str], g: Guardrails
              ) -> tuple[np.ndarray, np.ndarray]:
    """(shape, rate) of each channel's Gamma posterior over conversions per unit of spend."""
    periods = sorted({str(r["date"]) for r in rows})
    age = {p: len(periods) - 1 - i for i, p in enumerate(periods)}
    conv = np.zeros(len(channels))
    spend = np.zeros(len(channels))
    idx = {c: i for i, c in enumerate(channels)}
    for r in rows:
        w = g.decay ** age[str(r["date"])]
        conv[idx[r["channel"]]] += w * float(r["conversions"])
        spend[idx[r["channel"]]] += w * float(r["spend"])
    pooled = conv.sum() / spend.sum() if spend.sum() > 0 else 0.0
    prior_spend = g.prior_weight * (spend.mean() if spend.mean() > 0 else 1.0)
    prior_conv = max(pooled * prior_spend, 1e-3)
    return prior_conv + conv, prior_spend + spend


def _bounds(previous: np.ndarray, budget: float, g: Guardrails) -> tuple[np.ndarray, np.ndarray]:
    n = len(previous)
    floor = g.min_share * budget
    if floor * n > budget + 1e-9:
        raise AllocationError(f"min_share {g.min_share} x {n} channels is more than the whole budget")
    lo = np.maximum(floor, previous - g.max_shift * budget)
    hi = np.maximum(previous + g.max_shift * budget, lo)
    if lo.sum() > budget:  # the floors win over the shift limit when the budget shrank
        lo = np.full(n, floor)
    if hi.sum() < budget:  # the budget grew more than shifts allow: let every channel grow alike
        hi = hi + (budget - hi.sum()) / n
    return lo, hi


def best_under_bounds(rates: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float) -> np.ndarray:
    """The allocation maximising sum(rate x amount) with lo <= amount <= hi and sum(amount) == budget:
    every channel at its floor, then the rest to the best channels up to their ceilings."""
    out = lo.copy()
    left = budget - lo.sum()
    for i in np.argsort(-rates, kind="stable"):
        if left <= 0:
            break
        add = min(hi[i] - out[i], left)
        out[i] += add
        left -= add
    return out


def reallocate(rows: Sequence[Mapping[str, Any]], budget: float, *, previous: Mapping[str, float] | None = None,
               guardrails: Guardrails = Guardrails(), seed: int = 0) -> Allocation:
    """Next period's allocation of ``budget`` from ``rows`` (``date, channel, spend, conversions``; other
    columns ignored). See the module docstring."""
    if budget <= 0:
        raise AllocationError("the budget must be positive")
    if not rows:
        raise AllocationError("no performance rows: give at least one period of spend and conversions per channel")
    for n, r in enumerate(rows, 1):
        for k in ("date", "channel", "spend", "conversions"):
            if r.get(k) in (None, ""):
                raise AllocationError(f"row {n}: no {k}")
        if float(r["spend"]) < 0 or float(r["conversions"]) < 0:
            raise AllocationError(f"row {n}: spend and conversions cannot be negative")
    g = guardrails
    channels = sorted({str(r["channel"]) for r in rows})
    shape, rate = posterior(rows, channels, g)
    last = max(str(r["date"]) for r in rows)
    if previous is None:
        spent = {c: sum(float(r["spend"]) for r in rows if str(r["date"]) == last and r["channel"] == c)
                 for c in channels}
        total = sum(spent.values())
        prev = np.array([spent[c] / total * budget if total > 0 else budget / len(channels) for c in channels])
    else:
        prev = np.array([float(previous.get(c, 0.0)) for c in channels])
        prev = prev / prev.sum() * budget if prev.sum() > 0 else np.full(len(channels), budget / len(channels))
    lo, hi = _bounds(prev, budget, g)
    rng = np.random.default_rng(seed)
    draws = rng.gamma(shape, 1.0 / rate, size=(g.samples, len(channels)))
    allocs = np.array([best_under_bounds(d, lo, hi, budget) for d in draws])
    amount = allocs.mean(axis=0)
    cents = np.round(amount, 2)
    cents[int(np.argmax(cents))] += round(budget - cents.sum(), 2)
    mean = shape / rate
    p_best = np.bincount(draws.argmax(axis=1), minlength=len(channels)) / g.samples
    q05, q95 = (np.quantile(draws, q, axis=0) for q in (0.05, 0.95))
    reasons, detail = {}, {}
    for i, c in enumerate(channels):
        change = cents[i] - prev[i]
        capped = ("at the minimum share" if cents[i] <= lo[i] + 0.005 else
                  "at the maximum shift" if cents[i] >= hi[i] - 0.005 else "")
        reasons[c] = (f"{1000 * mean[i]:.2f} conversions per 1,000 spent (90 % interval {1000 * q05[i]:.2f}-"
                      f"{1000 * q95[i]:.2f}), P(best) {p_best[i]:.0%}; {'+' if change >= 0 else ''}{change:,.2f} "
                      f"from {prev[i]:,.2f}" + (f", {capped}" if capped else ""))
        detail[c] = {"rate_per_1000": round(1000 * mean[i], 4), "interval_90": [round(1000 * q05[i], 4),
                                                                                round(1000 * q95[i], 4)],
                     "p_best": round(float(p_best[i]), 4), "previous": round(float(prev[i]), 2),
                     "amount": float(cents[i])}
    return Allocation({c: float(cents[i]) for i, c in enumerate(channels)}, float((cents * mean).sum()), reasons,
                      detail)


def greedy(rows, budget: float, *, previous=None, guardrails: Guardrails = Guardrails()) -> dict[str, float]:
    """The point-estimate policy (the posterior mean's best allocation under the same guardrails): the
    comparison Thompson sampling must beat."""
    g = guardrails
    channels = sorted({str(r["channel"]) for r in rows})
    shape, rate = posterior(rows, channels, g)
    prev = np.array([float((previous or {}).get(c, budget / len(channels))) for c in channels])
    lo, hi = _bounds(prev / prev.sum() * budget, budget, g)
    return dict(zip(channels, best_under_bounds(shape / rate, lo, hi, budget).tolist()))


# --- performance with intervals ------------------------------------------------------------------------------

def _wilson(k: float, n: float, z: float) -> list[float | None]:
    if n <= 0:
        return [None, None]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(max(0.0, centre - half)), 6), round(float(min(1.0, centre + half)), 6)]


def _poisson_interval(k: float, level: float) -> tuple[float, float]:
    """Exact (Garwood) interval of a Poisson count."""
    from scipy.stats import chi2

    a = 1 - level
    lo = 0.0 if k == 0 else float(chi2.ppf(a / 2, 2 * k) / 2)
    hi = float(chi2.ppf(1 - a / 2, 2 * k + 2) / 2)
    return lo, hi


def performance_table(rows: Sequence[Mapping[str, Any]], by: Sequence[str] = ("channel",),
                      level: float = 0.9) -> list[dict[str, Any]]:
    """Per group of ``by``: impressions, clicks, conversions, spend, revenue and the rates with ``level``
    intervals, not just point values: CTR (clicks / impressions) and CVR (conversions / clicks) with Wilson
    intervals; CPA (spend / conversions) and ROAS (revenue / spend) from the exact Poisson interval of the
    conversions (the uncertainty that matters at marketing volumes; revenue per conversion taken as observed)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        key = tuple(str(r.get(b)) for b in by)
        g = groups.setdefault(key, {"impressions": 0.0, "clicks": 0.0, "conversions": 0.0, "spend": 0.0,
                                    "revenue": 0.0, "days": set()})
        for k in ("impressions", "clicks", "conversions", "spend", "revenue"):
            g[k] += float(r.get(k) or 0)
        g["days"].add(str(r.get("date")))
    out = []
    for key, g in sorted(groups.items()):
        conv_lo, conv_hi = _poisson_interval(g["conversions"], level)
        per_conv = g["revenue"] / g["conversions"] if g["conversions"] else 0.0
        rec: dict[str, Any] = {**dict(zip(by, key)), "days": len(g["days"]),
                               **{k: round(g[k], 2) for k in ("impressions", "clicks", "conversions", "spend", "revenue")}}
        rec["ctr"] = round(g["clicks"] / g["impressions"], 6) if g["impressions"] else None
        rec["ctr_interval"] = _wilson(g["clicks"], g["impressions"], z)
        rec["cvr"] = round(g["conversions"] / g["clicks"], 6) if g["clicks"] else None
        rec["cvr_interval"] = _wilson(g["conversions"], g["clicks"], z)
        rec["cpa"] = round(g["spend"] / g["conversions"], 4) if g["conversions"] else None
        rec["cpa_interval"] = [round(g["spend"] / conv_hi, 4) if conv_hi else None,
                               round(g["spend"] / conv_lo, 4) if conv_lo else None]
        rec["roas"] = round(g["revenue"] / g["spend"], 4) if g["spend"] else None
        rec["roas_interval"] = ([round(conv_lo * per_conv / g["spend"], 4), round(conv_hi * per_conv / g["spend"], 4)]
                                if g["spend"] and g["conversions"] else [None, None])
        out.append(rec)
    return out
