"""`orch marketing ...`: the marketing program's tools that work without Dagster (the flow itself: flow.py).

    orch marketing sentiment [--jsonl FILE] [--model-dir DIR]
    orch marketing reallocate --performance FILE.csv --budget B [--previous FILE.json] [--min-share S] [--max-shift S] [--json]

``sentiment`` labels posts negative / neutral / positive with a score (``orch_project.lib.sentiment``: the model
the program's listening stage serves), one ``{"id", "label", "score"}`` line per input line: ``{"id", "text"}``
lines from FILE, or stdin (JSON lines, or one plain post a line, ids counted from 1). The model is trained on
first use from TweetEval's labelled dev tweets ($ORCH_DATA_DIR/tweets-dev, a few seconds) and kept in
$ORCH_MODELS_DIR/sentiment.

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


@click.group(name="marketing", help="The marketing program's tools: sentiment of social posts (the model the flow "
                                    "serves) and budget re-allocation across channels (the method the flow uses).")
def group() -> None:
    pass


def sentiment_model(model_dir: Path | None = None, progress=None):
    """The model the program's sentiment stage serves (``logic.sentiment_model``), with a message that says what
    to set when the labelled tweets are missing."""
    from ...lib import datasets
    from .logic import sentiment_model as serve

    try:
        return serve(model_dir, progress)
    except datasets.DatasetMissing as exc:
        raise click.ClickException(f"{exc} The sentiment model is trained on TweetEval's labelled dev tweets: set "
                                   "ORCH_DATA_DIR to the folder that holds tweets-dev/.")


@group.command(help="Label social posts negative / neutral / positive with a score: {\"id\", \"text\"} JSON lines "
                    "from --jsonl FILE or stdin (plain lines are posts too); one {\"id\", \"label\", \"score\"} "
                    "line each, in input order.")
@click.option("--jsonl", "jsonl", type=click.Path(path_type=Path), default=None, help="JSON lines {\"id\", \"text\"}")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="where the model is kept (default $ORCH_MODELS_DIR/sentiment)")
def sentiment(jsonl: Path | None, model_dir: Path | None) -> None:
    import sys

    if jsonl is not None and not jsonl.is_file():
        raise click.ClickException(f"--jsonl {jsonl} does not exist")
    lines = (jsonl.read_text(encoding="utf-8") if jsonl else sys.stdin.read()).splitlines()
    posts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            if not isinstance(obj.get("text"), str):
                raise click.ClickException(f"line {n}: no \"text\" string; give {{\"id\", \"text\"}} per line")
            posts.append((obj.get("id", n), obj["text"]))
        elif jsonl is not None:
            raise click.ClickException(f"{jsonl} line {n}: not a JSON object; give {{\"id\", \"text\"}} per line")
        else:
            posts.append((n, line))
    model = sentiment_model(model_dir, progress=lambda m: click.echo(m, err=True))
    for (pid, _), out in zip(posts, model.predict([t for _, t in posts])):
        click.echo(json.dumps({"id": pid, **out}, ensure_ascii=False))


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
