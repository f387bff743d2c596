"""`orch model ...` (the registry of served models) and `orch triage ...` (train and evaluate the
embedded intent model on your own labelled tickets). Registered on the main `orch` group."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import click

TASK = "triage"


def _report_served(out: dict, actor: str) -> None:
    """Tell the Dagster instance that the served model changed (a runless materialisation of the task's
    promotion asset with the model id as data version), so the UI marks the stages that use it stale."""
    import dagster as dg

    from .cli import _dagster_home, _settings, all_flows, open_db
    from .lib import flows
    from .lib.llm import registry

    _dagster_home(_settings())
    metrics = (registry.get(open_db(), out["promoted"]) or {}).get("metrics", {})
    if out.get("task", TASK) == TASK:
        from .defs.support.triage_model import served_model_event

        event = served_model_event(out, metrics, actor)
    else:
        from .kit.governance import served_event

        all_flows()  # registers every flow's governed models
        governed = flows.governed_model(out["task"])
        if governed is None:
            return
        event = served_event(governed, out, metrics, actor)
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(event)


task_option = click.option("--task", default=TASK, show_default=True,
                           help="the model task (the registry is keyed by task: triage, lead_score, ...)")


@click.group(help="The model registry: which model serves each task (triage by default), and its history.")
def model() -> None:
    pass


@model.command("list", help="Every registered version of the task, newest first, with its status and metrics.")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@task_option
def model_list(as_json: bool, task: str) -> None:
    from .cli import open_db
    from .lib.llm import registry

    rows = registry.list_versions(open_db(), task)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(f"no {task} models yet" + (": `orch demo` or the train_triage_model_job trains one"
                                              if task == TASK else ""))
        return
    metric = "validation_accuracy" if task == TASK else "auc"
    click.echo(f"{'version':<22}{'status':<13}{metric[:8]:>8}  {'code version':<22}created")
    for r in rows:
        m = r["metrics"] or {}
        value = m.get(metric, (m.get("validation") or {}).get(metric, float("nan")))
        click.echo(f"{r['version']:<22}{r['status']:<13}{value:>8.4f}  "
                   f"{r['code_version']:<22}{r['created_at']:%Y-%m-%d %H:%M}")


@model.command("promote", help="Serve VERSION from now on (audited; the previous version is retired).")
@click.argument("version")
@click.option("--as", "actor", default="cli", show_default=True, help="who asks for it (audit log)")
@click.option("--reason", default="", help="why (audit log)")
def model_promote(version: str, actor: str, reason: str) -> None:
    from .cli import open_db
    from .lib.llm import registry

    try:
        out = registry.promote(open_db(), version, actor=actor, reason=reason)
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc))
    if out["changed"]:
        _report_served(out, actor)
    click.echo(json.dumps(out))


@model.command("rollback", help="Serve the task's previously promoted version again (audited).")
@click.option("--as", "actor", default="cli", show_default=True, help="who asks for it (audit log)")
@click.option("--reason", default="", help="why (audit log)")
@task_option
def model_rollback(actor: str, reason: str, task: str) -> None:
    from .cli import open_db
    from .lib.llm import registry

    try:
        out = registry.rollback(open_db(), task, actor=actor, reason=reason)
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc))
    _report_served(out, actor)
    click.echo(json.dumps(out))


# --- bring your own labelled tickets ---------------------------------------------------------

def read_labelled_file(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """CSV (by header) or JSON lines; every row needs both columns as non-empty strings."""
    texts, labels = [], []
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = (json.loads(line) for line in fh if line.strip()) if is_jsonl else csv.DictReader(fh)
        try:
            for n, row in enumerate(rows, 1 if is_jsonl else 2):
                if not isinstance(row, dict) or text_column not in row or label_column not in row:
                    raise click.ClickException(f"{path}: row {n} lacks column {text_column!r} or {label_column!r}; "
                                               "name the right ones with --text-column / --label-column")
                text, label = row[text_column], row[label_column]
                if not isinstance(text, str) or not isinstance(label, str) or not text.strip() or not label.strip():
                    raise click.ClickException(f"{path}: row {n} has an empty or non-text {text_column!r}/"
                                               f"{label_column!r}")
                texts.append(text)
                labels.append(label.strip())
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"{path}: not JSON lines ({exc.msg}); use .csv for CSV files")
    if not texts:
        raise click.ClickException(f"{path}: no rows")
    return texts, labels


def _model_dir(model_dir: Path | None) -> Path:
    if model_dir is not None:
        return model_dir
    from .cli import _settings

    return _settings().models_dir / "triage-custom"


COMMON = [
    click.option("--text-column", required=True, help="column holding the ticket text"),
    click.option("--label-column", required=True, help="column holding the label"),
    click.option("--out-of-scope-label", "oos_label", default=None,
                 help="label of examples that fit no intent: used to calibrate rejection ('unknown')"),
    click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="where the model lives (default $ORCH_MODELS_DIR/triage-custom)"),
]


def _common(f):
    for opt in reversed(COMMON):
        f = opt(f)
    return f


@click.group(help="Train and evaluate the embedded intent model on your own labelled tickets (CSV or JSON lines).")
def triage() -> None:
    pass


@triage.command("train", help="Train on FILE; a held-out tenth calibrates confidence and the out-of-scope "
                              "threshold. Writes the model to --model-dir; the last line is a JSON summary.")
@click.option("--train", "train_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common
def triage_train(train_file: Path, text_column: str, label_column: str, oos_label: str | None,
                 model_dir: Path | None) -> None:
    from .lib.llm import triage_model as tm

    texts, labels = read_labelled_file(train_file, text_column, label_column)
    click.echo(f"training on {len(texts)} examples, {len(set(labels))} labels ...", err=True)
    t0 = time.perf_counter()
    try:
        model = tm.train(texts, labels, oos_label=oos_label)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    seconds = time.perf_counter() - t0
    out_dir = _model_dir(model_dir)
    path = model.save(out_dir)
    (out_dir / "latest.json").write_text(json.dumps({"version": model.version, "path": path.name}))
    click.echo(f"model {model.version} -> {path}", err=True)
    click.echo(json.dumps({"version": model.version, "train_seconds": round(seconds, 2), **model.metrics}))


@triage.command("evaluate", help="Evaluate the model in --model-dir on FILE. The last line is one JSON object "
                                 '{"n", "accuracy", "macro_f1", "in_scope_accuracy", "oos_recall", ...}.')
@click.option("--test", "test_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common
def triage_evaluate(test_file: Path, text_column: str, label_column: str, oos_label: str | None,
                    model_dir: Path | None) -> None:
    from .lib.llm import triage_model as tm

    folder = _model_dir(model_dir)
    pointer = folder / "latest.json"
    if not pointer.exists():
        raise click.ClickException(f"no model in {folder}: run `orch triage train --model-dir {folder} ...` first")
    model = tm.TriageModel.load(folder / json.loads(pointer.read_text())["path"])
    texts, labels = read_labelled_file(test_file, text_column, label_column)
    t0 = time.perf_counter()
    result = tm.evaluate(model, texts, labels, oos_label=oos_label)
    click.echo(f"model {model.version}: {len(texts)} examples in {time.perf_counter() - t0:.2f} s", err=True)
    click.echo(json.dumps(result))
    sys.stdout.flush()
