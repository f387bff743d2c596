"""`orch marketing ...`: the marketing program's tools that work without Dagster (the program's flow comes next).

    orch marketing reallocate --performance FILE.csv --budget B [--previous FILE.json] [--min-share S] [--max-shift S] [--json]

``reallocate`` reads rows ``date, channel, spend, impressions, clicks, conversions`` (extra columns ignored) and
prints the next period's allocation: Thompson sampling on conversions per unit of spend with guardrails
(``orch_project.lib.allocation``). Progress and warnings go to stderr; with ``--json`` the last line on stdout
is ``{"allocation": {channel: amount}, "expected_conversions", "reasons"}``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click


@click.group(name="marketing", help="The marketing program: budget re-allocation across channels from their "
                                    "performance (more commands come with the program's flow).")
def group() -> None:
    pass


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise click.ClickException(f"performance file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise click.ClickException(f"could not read {path} as CSV ({exc}); save it as UTF-8 CSV with a header row")
    if not rows:
        raise click.ClickException(f"{path} has no rows: give one row per date and channel")
    need = {"date", "channel", "spend", "conversions"}
    if missing := sorted(need - set(rows[0])):
        raise click.ClickException(f"{path} lacks column(s) {', '.join(missing)}; the columns are "
                                   "date, channel, spend, impressions, clicks, conversions")
    for n, r in enumerate(rows, 2):
        for k in ("spend", "conversions"):
            try:
                float(r[k])
            except (TypeError, ValueError):
                raise click.ClickException(f"{path} line {n}: {k} {r[k]!r} is not a number")
    return rows


@group.command(help="The next period's budget per channel from past performance (CSV: date, channel, spend, "
                    "impressions, clicks, conversions): Thompson sampling on conversions per unit of spend, "
                    "within the guardrails (every channel keeps --min-share of the budget; none moves by more "
                    "than --max-shift of it from the previous amount, by default the last period's spend).")
@click.option("--performance", "performance", required=True, type=click.Path(path_type=Path),
              help="CSV of past periods")
@click.option("--budget", required=True, type=float, help="the next period's budget")
@click.option("--previous", type=click.Path(path_type=Path), default=None,
              help="JSON {channel: amount} of the current allocation (default: the last period's spend)")
@click.option("--min-share", type=float, default=0.05, show_default=True)
@click.option("--max-shift", type=float, default=0.15, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="random seed of the posterior draws")
@click.option("--json", "as_json", is_flag=True, help="one JSON object as the last line")
def reallocate(performance: Path, budget: float, previous: Path | None, min_share: float, max_shift: float, seed: int,
               as_json: bool) -> None:
    from ...lib import allocation

    rows = _rows(performance)
    prev = None
    if previous is not None:
        try:
            prev = {str(k): float(v) for k, v in json.loads(previous.read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise click.ClickException(f"--previous {previous}: not a JSON object of channel: amount ({exc})")
    try:
        g = allocation.Guardrails(min_share=min_share, max_shift=max_shift)
        out = allocation.reallocate(rows, budget, previous=prev, guardrails=g, seed=seed)
    except (allocation.AllocationError, ValueError) as exc:
        raise click.ClickException(str(exc))
    if as_json:
        click.echo(json.dumps(out.as_dict()))
        return
    click.echo(f"{'channel':<16}{'amount':>12}  why")
    for c, amount in out.allocation.items():
        click.echo(f"{c:<16}{amount:>12,.2f}  {out.reasons[c]}")
    click.echo(f"expected conversions: {out.expected_conversions:,.1f}")
