"""Budget re-allocation on a seeded simulation with known true conversion rates: regret against the oracle over
12 periods for Thompson sampling (``orch_project.lib.allocation.reallocate``, what `orch marketing reallocate`
runs), a greedy allocator (the posterior mean's best allocation) and an equal split, all under the same
guardrails.

    .venv/bin/python benchmarks/marketing_allocation.py [--worlds 100] [--periods 12]

Each world draws 4 channels' true conversions per 1,000 spent (log-normal around 12, so channels differ by
about a factor of two) and the same start: period 0 spent equally. In a drifting world the true rates take a
log-normal random walk step every period (``drift`` = its standard deviation: creative fatigue, seasonality,
competitors' bids); regimes: drift 0 (stationary), 0.2 and 0.3, budgets 1,500 and 5,000 a period. Every period each policy allocates the
budget from the evidence so far (date, channel, spend, conversions), the world answers with Poisson
conversions at the true rates, and the evidence grows. The oracle knows the true rates and moves towards the
best allocation as fast as the guardrails let it (min share 5 %, max shift 15 % of the budget per channel and
period). Regret = the oracle's expected conversions minus the policy's, summed over the periods (expected
under the true rates, so the noise of one world's draws does not decide it). The last line on stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orch_project.lib.allocation import Guardrails, _bounds, best_under_bounds, greedy, reallocate  # noqa: E402

CHANNELS = ("display", "email", "search", "social")


def world(seed: int, periods: int, budget: float, g: Guardrails, drift: float = 0.0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    path = [rng.lognormal(np.log(12 / 1000), 0.35, len(CHANNELS))]
    for _ in range(periods):
        path.append(path[-1] * np.exp(rng.normal(0, drift, len(CHANNELS))) if drift else path[-1])
    equal = np.full(len(CHANNELS), budget / len(CHANNELS))
    regrets = {}
    oracle_prev = equal.copy()
    oracle_value = []
    for t in range(periods):
        lo, hi = _bounds(oracle_prev, budget, g)
        oracle_prev = best_under_bounds(path[t + 1], lo, hi, budget)
        oracle_value.append(float(path[t + 1] @ oracle_prev))
    for policy in ("thompson", "greedy", "equal"):
        sim = np.random.default_rng(seed + 10_000)  # the same world answers every policy alike
        rows = [{"date": "p00", "channel": c, "spend": equal[i], "conversions": int(sim.poisson(path[0][i] * equal[i]))}
                for i, c in enumerate(CHANNELS)]
        prev = dict(zip(CHANNELS, equal))
        regret = 0.0
        for t in range(periods):
            if policy == "thompson":
                alloc = reallocate(rows, budget, previous=prev, guardrails=g, seed=seed * 100 + t).allocation
            elif policy == "greedy":
                alloc = greedy(rows, budget, previous=prev, guardrails=g)
            else:
                alloc = dict(zip(CHANNELS, equal))
            amounts = np.array([alloc[c] for c in CHANNELS])
            true = path[t + 1]
            regret += oracle_value[t] - float(true @ amounts)
            rows += [{"date": f"p{t + 1:02d}", "channel": c, "spend": amounts[i],
                      "conversions": int(sim.poisson(true[i] * amounts[i]))} for i, c in enumerate(CHANNELS)]
            prev = alloc
        regrets[policy] = regret
    regrets["oracle_conversions"] = sum(oracle_value)
    return regrets


def summary(results: list[dict[str, float]]) -> dict:
    out: dict = {}
    for policy in ("thompson", "greedy", "equal"):
        r = np.array([x[policy] for x in results])
        half = 1.96 * r.std(ddof=1) / np.sqrt(len(r))
        out[policy] = {"mean_regret": round(float(r.mean()), 2),
                       "ci95": [round(float(r.mean() - half), 2), round(float(r.mean() + half), 2)]}
    th, gr, eq = (np.array([x[p] for x in results]) for p in ("thompson", "greedy", "equal"))
    out["thompson_below_greedy_share"] = round(float((th < gr).mean()), 3)
    out["thompson_below_equal_share"] = round(float((th < eq).mean()), 3)
    out["oracle_conversions_mean"] = round(float(np.mean([x["oracle_conversions"] for x in results])), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, default=100)
    ap.add_argument("--periods", type=int, default=12)
    ap.add_argument("--samples", type=int, default=500, help="Thompson draws per allocation")
    args = ap.parse_args(argv)
    g = Guardrails(samples=args.samples)
    out: dict = {"benchmark": "marketing_allocation", "worlds": args.worlds, "periods": args.periods,
                 "guardrails": {"min_share": g.min_share, "max_shift": g.max_shift, "decay": g.decay}, "regimes": []}
    for drift in (0.0, 0.2, 0.3):
        for budget in (1500.0, 5000.0):
            res = summary([world(s, args.periods, budget, g, drift) for s in range(args.worlds)])
            out["regimes"].append({"drift": drift, "budget": budget, **res})
            print(f"drift {drift} budget {budget:g}: regret thompson {res['thompson']['mean_regret']} "
                  f"greedy {res['greedy']['mean_regret']} equal {res['equal']['mean_regret']} "
                  f"(thompson below greedy in {res['thompson_below_greedy_share']:.0%} of worlds)", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
