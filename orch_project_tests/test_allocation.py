"""Budget re-allocation (lib/allocation.py) and `orch marketing reallocate`: guardrails hold in every
allocation, evidence moves money, bad input is refused with what to fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from orch_project.lib import allocation as al


def rows(periods: int, rates: dict[str, float], spend: dict[str, float], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"date": f"2026-11-{p + 1:02d}", "channel": c, "spend": spend[c],
             "conversions": int(rng.poisson(rates[c] * spend[c]))} for p in range(periods) for c in rates]


RATES = {"display": 0.004, "email": 0.02, "search": 0.012, "social": 0.008}
EVEN = {c: 2500.0 for c in RATES}


def test_money_moves_towards_the_better_channel_within_the_guardrails():
    g = al.Guardrails(min_share=0.05, max_shift=0.15)
    out = al.reallocate(rows(6, RATES, EVEN), 10_000, guardrails=g)
    a = out.allocation
    assert sum(a.values()) == pytest.approx(10_000, abs=0.01)
    assert all(v >= 500 - 0.01 for v in a.values())  # min share
    assert all(abs(v - 2500) <= 1500 + 0.01 for v in a.values())  # max shift from the last period's spend
    assert a["email"] > 2500 > a["display"]
    assert "P(best)" in out.reasons["email"] and "interval" in out.reasons["email"]
    assert out.detail["email"]["p_best"] > 0.9
    assert out.expected_conversions > sum(RATES[c] * 2500 for c in RATES)  # better than staying put


def test_thompson_hedges_by_uncertainty_where_greedy_goes_all_in():
    # "known" has a long record at 12 per 1,000; "new" converted a little better on little spend: greedy moves
    # every movable euro to it, Thompson moves about as much as the chance that it really is better
    r = [{"date": f"2026-11-{p:02d}", "channel": "known", "spend": 5000, "conversions": 60} for p in range(1, 9)]
    r += [{"date": "2026-11-08", "channel": "new", "spend": 400, "conversions": 6}]
    prev = {"known": 5000, "new": 5000}
    g = al.Guardrails(min_share=0.05, max_shift=0.3)
    th = al.reallocate(r, 10_000, previous=prev, guardrails=g)
    gr = al.greedy(r, 10_000, previous=prev, guardrails=g)
    assert gr["new"] == pytest.approx(8000)  # at its ceiling: all in on a point estimate
    p_new = th.detail["new"]["p_best"]
    assert 0.3 < p_new < 0.9
    assert 2000 + 100 < th.allocation["new"] < 8000 - 100  # strictly inside its bounds: a hedge
    assert th.allocation["new"] == pytest.approx(2000 + 6000 * p_new, abs=300)


def test_bad_input_is_refused_with_what_to_fix(tmp_path):
    with pytest.raises(al.AllocationError, match="budget must be positive"):
        al.reallocate(rows(1, RATES, EVEN), 0)
    with pytest.raises(al.AllocationError, match="row 1: no spend"):
        al.reallocate([{"date": "d", "channel": "x", "conversions": 1}], 100)
    with pytest.raises(al.AllocationError, match="more than the whole budget"):
        al.reallocate(rows(1, RATES, EVEN), 100, guardrails=al.Guardrails(min_share=0.3))
    from orch_project.cli import main

    bad = tmp_path / "p.csv"
    bad.write_text("date,channel,spend\n2026-11-01,search,10\n")
    res = CliRunner().invoke(main, ["marketing", "reallocate", "--performance", str(bad), "--budget", "100"])
    assert res.exit_code != 0 and "lacks column(s) conversions" in res.output


def test_cli_prints_the_allocation_as_json(tmp_path):
    from orch_project.cli import main

    perf = tmp_path / "perf.csv"
    lines = ["date,channel,spend,impressions,clicks,conversions"]
    lines += [f"{r['date']},{r['channel']},{r['spend']},1000,100,{r['conversions']}" for r in rows(3, RATES, EVEN)]
    perf.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(main, ["marketing", "reallocate", "--performance", str(perf), "--budget", "8000", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out) == {"allocation", "expected_conversions", "reasons"}
    assert sum(out["allocation"].values()) == pytest.approx(8000, abs=0.01) and set(out["reasons"]) == set(RATES)
