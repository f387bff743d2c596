"""`orch leads ...`: train, evaluate and run the lead scorer on your own lead history.

    orch leads train --train FILE --label-column C [--id-column C] [--exclude-columns A,B] [--model-dir DIR] [--seed N]
    orch leads evaluate --test FILE --label-column C [--id-column C] [--model-dir DIR|FILE]
    orch leads score FILE [--model-dir DIR|FILE] [--id-column C] [--jsonl]

The columns are whatever the file has (CSV, or JSON lines for .jsonl/.ndjson/.json): the generic scorer
``orch_project.lib.tabular`` types them itself. Models go to ``$ORCH_HOME/models/leads`` by default
(``ORCH_MODELS_DIR`` moves the models folder); ``evaluate`` and ``score`` use the newest model there, or
the model file given. Progress goes to stderr; the last line on stdout is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

MODEL_NAME = "lead_score"


def _default_model_dir() -> Path:
    from ...lib.settings import Settings

    return Settings.from_env().models_dir / "leads"


def _read(path: Path, what: str):
    """The table at ``path``, or a click error saying what is wrong and what to do."""
    import pandas as pd

    from ...lib import tabular

    if not path.exists():
        raise click.ClickException(f"{what} file {path} does not exist")
    if not path.is_file():
        raise click.ClickException(f"{what} file {path} is not a file")
    try:
        df = tabular.read_table(path)
    except pd.errors.EmptyDataError:
        raise click.ClickException(f"{what} file {path} is empty: give a CSV with a header row and one lead per "
                                   f"row (or JSON lines, one object per lead)")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise click.ClickException(f"could not read {what} file {path} ({exc}); give a CSV (comma-separated, "
                                   f"header row, UTF-8) or JSON lines (.jsonl)")
    if df.empty:
        raise click.ClickException(f"{what} file {path} has no rows: give one lead per row under the header")
    return df


def _need_column(df, column: str | None, option: str, path: Path) -> None:
    if column is not None and column not in df.columns:
        shown = ", ".join(map(str, df.columns[:40])) + (" ..." if len(df.columns) > 40 else "")
        raise click.ClickException(f"{path} has no column {column!r} ({option}); its columns are: {shown}")


def _load(model_dir: Path | None):
    from ...lib import tabular

    where = model_dir or _default_model_dir()
    try:
        path = tabular.latest_model(where)
        return tabular.TabularModel.load(path), path
    except FileNotFoundError:
        raise click.ClickException(f"no lead model in {where}; train one first: "
                                   f"orch leads train --train FILE --label-column C --model-dir {where}")
    except tabular.ModelVersionError as exc:
        raise click.ClickException(str(exc))


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)


@click.group(name="leads", help="The lead scorer: train a calibrated model on your own labelled lead history "
                                "(any columns), evaluate it on held-out leads, score new leads with reasons.")
def group() -> None:
    pass


@group.command(help="Train a lead scorer on a labelled history (CSV or JSON lines) and save it in --model-dir. "
                    "Columns are typed from the data (ids, numbers, yes/no flags, categories, free text; "
                    "placeholders such as 'Select' count as missing). Last line on stdout: a JSON summary.")
@click.option("--train", "train_file", required=True, type=click.Path(path_type=Path), help="labelled history")
@click.option("--label-column", required=True, help="the outcome column: 0/1, true/false, yes/no, converted/not")
@click.option("--id-column", default=None, help="the lead id column (never used as a feature)")
@click.option("--exclude-columns", default="", help="comma-separated columns to leave out (e.g. ones filled in "
                                                    "only after qualification)")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="where to save the model (default $ORCH_HOME/models/leads)")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed (training is deterministic)")
def train(train_file: Path, label_column: str, id_column: str | None, exclude_columns: str, model_dir: Path | None,
          seed: int) -> None:
    from ...lib import tabular

    df = _read(train_file, "training")
    _need_column(df, label_column, "--label-column", train_file)
    _need_column(df, id_column, "--id-column", train_file)
    excluded = [c.strip() for c in exclude_columns.split(",") if c.strip()]
    for c in excluded:
        _need_column(df, c, "--exclude-columns", train_file)
    try:
        model = tabular.train(df, label_column, id_column=id_column, exclude_columns=excluded, seed=seed,
                              name=MODEL_NAME, progress=lambda m: click.echo(m, err=True))
    except tabular.TabularError as exc:
        raise click.ClickException(f"{exc} (in {train_file})")
    path = model.save(model_dir or _default_model_dir())
    click.echo(f"saved {path}", err=True)
    m = model.metrics
    click.echo(_dump({"version": model.version, "path": str(path), "validation": m["validation"],
                      "calibration": m["calibration"], "train_seconds": m["train_seconds"], "n_train": m["n_train"],
                      "columns": m["columns"]}))


@group.command(help="Evaluate the newest model in --model-dir (or the model file given) on labelled leads. "
                    "Last line on stdout: {\"n\", \"auc\", \"accuracy\", \"log_loss\", \"brier\", \"lift_top_decile\"}.")
@click.option("--test", "test_file", required=True, type=click.Path(path_type=Path), help="labelled leads")
@click.option("--label-column", required=True, help="the outcome column")
@click.option("--id-column", default=None, help="the lead id column (checked to exist; not a feature)")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="a model folder (its newest model) or a model file (default $ORCH_HOME/models/leads)")
def evaluate(test_file: Path, label_column: str, id_column: str | None, model_dir: Path | None) -> None:
    from ...lib import tabular

    df = _read(test_file, "test")
    _need_column(df, label_column, "--label-column", test_file)
    _need_column(df, id_column, "--id-column", test_file)
    model, path = _load(model_dir)
    _warn_missing(model, df)
    try:
        result = tabular.evaluate(model, df, label_column)
    except tabular.TabularError as exc:
        raise click.ClickException(f"{exc} (in {test_file})")
    click.echo(f"{model.version} ({path}) on {result['n']} leads", err=True)
    click.echo(_dump(result))


@group.command(help="Score leads (CSV or JSON lines) with the newest model: one {\"id\", \"score\", \"reasons\"} per "
                    "lead, the score a calibrated conversion probability and the reasons the columns that moved "
                    "it most, e.g. \"Lead Source = Reference (+0.21)\" (change in log-odds).")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="a model folder (its newest model) or a model file (default $ORCH_HOME/models/leads)")
@click.option("--id-column", default=None, help="the id column (default: the one the model was trained with)")
@click.option("--jsonl", is_flag=True, help="one compact JSON line per lead (default: indented)")
def score(file: Path, model_dir: Path | None, id_column: str | None, jsonl: bool) -> None:
    df = _read(file, "leads")
    _need_column(df, id_column, "--id-column", file)
    model, _ = _load(model_dir)
    _warn_missing(model, df)
    for rec in model.score(df, id_column=id_column):
        click.echo(_dump(rec) if jsonl else json.dumps(rec, ensure_ascii=False, indent=2, default=str))


def _warn_missing(model, df) -> None:
    missing = model.missing_columns(df)
    if missing:
        click.echo(f"warning: {len(missing)} column(s) the model uses are not in the file and count as missing: "
                   f"{', '.join(missing)}", err=True)
