"""`orch`: the command line for people running orch_project.

\b
    orch flows [--json]       the flows and their counts
    orch demo                 seed every flow's inbox with its shipped samples and run every flow
    orch submit FILE... [--flow F]   put sources in a flow's inbox (files into its folder; .jsonl into its table)
    orch status [--json] [--flow F]  where every received source is now (received == sum of states, per flow)
    orch dlq list [--json]    the dead-letter queue
    orch dlq show ID [--json]           one dead letter and whether it can be replayed
    orch dlq replay ID|--all [--json]   put dead-lettered items back in the flow
    orch audit ITEM           the audit trail of one item
    orch review list [--json] pending approvals (reason, required role, due date, overdue)
    orch approve ID --as USER [--reason R] [--edit-file F]   approve (role-checked, audited)
    orch reject ID --as USER --reason R                      reject (terminal)
    orch schemas export DIR   JSON Schemas of the contracts
    orch model list|promote VERSION|rollback    the triage model registry (audited)
    orch triage train|evaluate ...              the embedded intent model on your own labelled tickets
    orch pii scan             PII spans in the text on stdin, as JSON (Presidio, offline)
    orch pii scan --jsonl F   the same for each {"id", "text"} line of F, one JSON line each
    orch pii redact           the text on stdin with PII replaced by <ENTITY_TYPE>
    orch documents extract PATH... [--jsonl]    fields + validation of documents, without Dagster
    orch documents review ID                    a waiting document: its text, fields and failed rules
    orch leads train|evaluate|score ...         the lead-scoring model on any labelled tabular history
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import click

from .lib.settings import REPO_DIR, Settings


def _settings() -> Settings:
    s = Settings.from_env().ensure_dirs()
    os.environ.setdefault("ORCH_HOME", str(s.home))
    return s


def _dagster_home(s: Settings) -> Path:
    """DAGSTER_HOME (default ORCH_HOME/dagster) with the project's dagster.yaml in it."""
    home = Path(os.environ.get("DAGSTER_HOME") or s.home / "dagster")
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    source = REPO_DIR / "dagster.yaml"
    if not target.exists() and source.exists():
        shutil.copyfile(source, target)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _db(s: Settings):
    from .lib.store import Database

    return Database(s.database_url)


def open_db():
    """The app database as the environment configures it (for the command groups in other modules).
    The project's flows are registered first: replay targets, reviewer fields and allow-lists come
    from their specs."""
    all_flows()
    return _db(_settings())


def _out(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def flow_spec(name: str | None):
    """The flow named by --flow (or the only one there is); a usage error lists the flows otherwise."""
    from .kit.registry import resolve

    try:
        return resolve(name)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0]))


def all_flows() -> dict:
    from .kit.registry import discover

    return discover()


flow_option = click.option("--flow", "flow", default=None, metavar="FLOW",
                           help="the flow (see `orch flows`); optional while only one flow exists")


class FlowCommands(click.Group):
    """The platform's commands, plus one command group per flow folder with a ``cli.py`` defining ``group``
    (``orch documents ...``, ``orch leads ...``); a flow's group is imported only when it is used."""

    @staticmethod
    def flow_groups() -> list[str]:
        from .kit.registry import DEFS_DIR

        return sorted(p.name for p in DEFS_DIR.iterdir() if (p / "cli.py").is_file())

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.flow_groups()})

    def get_command(self, ctx: click.Context, name: str):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in self.flow_groups():
            import importlib

            cmd = importlib.import_module(f"orch_project.defs.{name}.cli").group
        return cmd


@click.group(cls=FlowCommands, help=__doc__)
def main() -> None:
    pass


@main.command(help="Create ORCH_HOME, DAGSTER_HOME and the app database schema.")
def init() -> None:
    s = _settings()
    home = _dagster_home(s)
    _db(s)
    click.echo(f"ORCH_HOME={s.home}\nDAGSTER_HOME={home}\napp database: {s.database_url}")


def submit_paths(s: Settings, paths: list[Path], spec=None) -> dict[str, int]:
    """Files the flow reads (its intake suffixes) are dropped atomically into the flow's inbox folder;
    .jsonl lines go to the flow's rows of the inbox table (unless the flow reads .jsonl files itself)."""
    from .lib.intake import drop_file, submit_to_table

    spec = spec or flow_spec(None)
    suffixes = tuple(spec.intake.suffixes)
    counts = {"files_added": 0, "files_already_there": 0, "table_rows_added": 0, "table_rows_already_there": 0}
    for p in paths:
        if p.is_dir():
            sub = submit_paths(s, sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")
                                         and (x.name.endswith(suffixes) or x.suffix == ".jsonl")), spec)
            for k, v in sub.items():
                counts[k] += v
        elif p.suffix == ".jsonl" and ".jsonl" not in suffixes:  # a flow that reads JSON-lines files takes the file
            msgs = []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        msgs.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise click.ClickException(f"{p}:{n}: not JSON ({exc.msg}); fix the line and submit again")
            added = submit_to_table(_db(s), spec.name, msgs, submitted_by=f"cli:{p.name}")
            counts["table_rows_added"] += added
            counts["table_rows_already_there"] += len(msgs) - added
        elif p.name.endswith(suffixes):
            if drop_file(spec.inbox_dir(s.inbox_dir), p.name, p.read_bytes()):
                counts["files_added"] += 1
            else:
                counts["files_already_there"] += 1
        else:
            raise click.ClickException(f"{p}: expected {', '.join(suffixes)}, .jsonl or a folder of them "
                                       f"(what flow {spec.name} reads)")
    return counts


@main.command(help="Put sources in a flow's inbox: files into the flow's inbox folder (ORCH_INBOX_DIR/<flow>), "
                   ".jsonl lines into its rows of the inbox table. Submitting the same file twice adds nothing.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@flow_option
def submit(paths: tuple[Path, ...], flow: str | None) -> None:
    s = _settings()
    _out(submit_paths(s, list(paths), flow_spec(flow)))


def _status_all(flow: str | None) -> dict:
    from .lib.pipeline import status_counts

    db = open_db()
    names = [flow_spec(flow).name] if flow else list(all_flows())
    per = {n: status_counts(db, n) for n in names}
    return {"flows": per, "received": sum(v["received"] for v in per.values()),
            "accounted": sum(v["accounted"] for v in per.values()), "lost": sum(v["lost"] for v in per.values())}


@main.command(help="Counts by state, per flow (every flow without --flow, with the total). Exit code 1 if any "
                   "received source is unaccounted for.")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@flow_option
def status(as_json: bool, flow: str | None) -> None:
    out = _status_all(flow)
    if as_json:
        _out(out["flows"][flow] if flow else out)
    else:
        for name, st in out["flows"].items():
            click.echo(f"{name}: received {st['received']}  " + "  ".join(f"{k} {v}" for k, v in st["states"].items()))
            click.echo(f"  escalated {st['escalated']}  open dead letters {st['dlq_open']}  unaccounted {st['lost']}")
        if not flow:
            click.echo(f"total: received {out['received']}  unaccounted {out['lost']}")
    sys.exit(1 if out["lost"] else 0)


@main.command(help="The flows of the project with their stages and counts (received, open, resolved, dead-lettered).")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def flows(as_json: bool) -> None:
    out = _status_all(None)
    rows = []
    for name, spec in all_flows().items():
        st = out["flows"][name]
        rows.append({"flow": name, "title": spec.title, "stages": list(spec.stage_names), "received": st["received"],
                     "in_progress": st["in_progress"], "resolved": st["states"].get("resolved", 0),
                     "dead_lettered": st["states"].get("dead_lettered", 0), "lost": st["lost"],
                     "inbox": str(spec.inbox_dir(_settings().inbox_dir))})
    if as_json:
        _out(rows)
        return
    for r in rows:
        click.echo(f"{r['flow']:<12} {r['title']:<28} received {r['received']:<6} in progress {r['in_progress']:<5} "
                   f"resolved {r['resolved']:<6} dead-lettered {r['dead_lettered']:<5} inbox {r['inbox']}")


@main.group(help="The dead-letter queue.")
def dlq() -> None:
    pass


@dlq.command("list", help="Dead letters, newest first (every flow's, or one flow's with --flow).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--status", "state", default="open", show_default=True, help="open | replayed | discarded | all")
@click.option("--flow", "flow", default=None, metavar="FLOW", help="only this flow's dead letters")
def dlq_list(as_json: bool, state: str, flow: str | None) -> None:
    import sqlalchemy as sa

    from .lib.store import dlq as dlq_table

    db = open_db()
    q = sa.select(dlq_table).order_by(dlq_table.c.id.desc())
    if state != "all":
        q = q.where(dlq_table.c.status == state)
    if flow:
        q = q.where(dlq_table.c.flow == flow_spec(flow).name)
    with db.begin() as conn:
        rows = [dict(r) for r in conn.execute(q).mappings()]
    if as_json:
        _out(rows)
        return
    if not rows:
        click.echo("dead-letter queue is empty")
    for r in rows:
        click.echo(f"#{r['id']:<5} {r['flow']:<10} {r['stage']:<10} {r['error_type']:<12} "
                   f"{r['item_id'] or r['source_key']}: {r['reason']}")


@dlq.command("show", help="One dead letter, the item's current status/stage, and whether it can be replayed.")
@click.argument("dlq_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.option("--flow", "flow", default=None, metavar="FLOW", help="refuse a dead letter of another flow")
def dlq_show(dlq_id: int, as_json: bool, flow: str | None) -> None:
    from .lib import dlq as dlq_lib

    try:
        row = dlq_lib.show(open_db(), dlq_id)
    except dlq_lib.DLQError as exc:
        raise click.ClickException(str(exc))
    if flow and row["flow"] != flow_spec(flow).name:
        raise click.ClickException(f"dead letter #{dlq_id} belongs to flow {row['flow']!r}, not {flow!r}")
    if as_json:
        _out(row)
        return
    item = row["item"]
    click.echo(f"#{row['id']} {row['status']}  flow {row['flow']}  stage {row['stage']}  error {row['error_type']}")
    click.echo(f"  item {row['item_id'] or '-'}  source {row['source_key'] or '-'}  trace {row['trace_id']}")
    click.echo(f"  reason: {row['reason']}")
    if item:
        click.echo(f"  item now: status {item['status']}, stage {item['stage']}, partition {item['day']}")
    if row["replayable"]:
        click.echo(f"  replay: back to status {row['replay_to']['status']!r} after stage {row['replay_to']['stage']!r}")
    else:
        click.echo(f"  not replayable: {row['not_replayable_reason']}")


@dlq.command("replay", help="Put a dead-lettered item back in the flow (status its failed stage loads, trace id "
                            "kept, audited); the next run of its partition reprocesses it. --all replays every "
                            "open replayable dead letter. Intake dead letters need the source fixed and submitted "
                            "again. Exit 1 if the dead letter cannot be replayed.")
@click.argument("dlq_id", type=int, required=False)
@click.option("--all", "replay_every", is_flag=True, help="every open dead letter of the flow")
@click.option("--json", "as_json", is_flag=True)
@flow_option
def dlq_replay(dlq_id: int | None, replay_every: bool, as_json: bool, flow: str | None) -> None:
    from .lib import dlq as dlq_lib

    if (dlq_id is None) == (not replay_every):
        raise click.UsageError("give a dead-letter ID or --all (not both)")
    db = open_db()
    actor = f"cli:{os.environ.get('USER', 'unknown')}"
    if replay_every:
        out = dlq_lib.replay_all(db, flow_spec(flow).name, actor=actor)
        if as_json:
            _out(out)
        else:
            click.echo(out["message"])
            for r in out["results"]:
                if not r["replayed"]:
                    click.echo(f"  #{r['id']}: {r['message']}")
        return
    try:
        out = dlq_lib.replay(db, dlq_id, actor=actor, flow=flow_spec(flow).name if flow else None)
    except dlq_lib.DLQError as exc:
        raise click.ClickException(str(exc))
    if as_json:
        _out(out)
    else:
        click.echo(out["message"])
    if not out["replayed"] and not out["noop"]:
        sys.exit(1)


def owning_flow(table, item_id: str, flow: str | None, missing: str):
    """The flow named by --flow (or the only one there is); without it, the one flow whose rows of ``table``
    (items, approvals: item ids are unique per flow, not across flows) have ``item_id``. ``missing`` is
    the error when none has."""
    import sqlalchemy as sa

    if flow or len(all_flows()) == 1:
        return flow_spec(flow)
    with open_db().begin() as conn:
        owners = sorted(set(conn.execute(sa.select(table.c.flow).where(table.c.item_id == item_id)).scalars()))
    if not owners:
        raise click.ClickException(missing)
    if len(owners) != 1:
        raise click.UsageError(f"item {item_id!r} is in {', '.join(owners)}: say which with --flow")
    return flow_spec(owners[0])


@main.command(help="The audit trail of one item (of the one flow that has it, or of --flow).")
@click.argument("item_id")
@flow_option
def audit(item_id: str, flow: str | None) -> None:
    from .lib.pipeline import audit_for

    from .lib.store import items

    spec = owning_flow(items, item_id, flow, f"no item {item_id!r} in any flow; check the id with `orch status` / "
                                             "the items table")
    rows = audit_for(open_db(), spec.name, item_id)
    if not rows:
        raise click.ClickException(f"no audit entries for {item_id!r} in flow {spec.name!r}; check the id with "
                                   "`orch status` / the items table")
    _out(rows)


@main.group(help="Contract schemas.")
def schemas() -> None:
    pass


@schemas.command("export", help="Write one JSON Schema file per contract into DIR.")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def schemas_export(directory: Path) -> None:
    from .lib.contracts import json_schemas

    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (directory / f"{name}.schema.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        click.echo(directory / f"{name}.schema.json")


@main.group(help="PII detection with Presidio, offline (no NLP model, no network). Entity types: PERSON, "
                 "EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE, US_SSN, IP_ADDRESS, LOCATION.")
def pii() -> None:
    pass


def _stdin_text() -> str:
    data = click.get_binary_stream("stdin").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"stdin is not UTF-8 text (byte {exc.start})")


def _spans_json(spans) -> list[dict]:
    return [{"entity_type": s.entity_type, "start": s.start, "end": s.end, "score": round(s.score, 2)} for s in spans]


def _jsonl_record(raw: bytes) -> tuple[dict | None, str | None]:
    """A {"id", "text"[, "known_names"]} line, or the reason it is not one."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg})"
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    if "id" not in rec:
        return None, 'no "id"'
    if not isinstance(rec.get("text"), str):
        return None, '"text" missing or not a string'
    names = rec.get("known_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None, '"known_names" is not a list of strings'
    return rec, None


@pii.command("scan", help="Print the PII spans in the text on stdin as a JSON list of {entity_type, start, end, "
                          "score}; offsets count characters (code points). With --jsonl FILE ('-' for stdin), read "
                          "lines {\"id\", \"text\"[, \"known_names\"]} and print one line {\"id\", \"spans\"} per "
                          "line; a bad line is reported on stderr with its number, the others are still scanned, "
                          "and the exit code is then 1.")
@click.option("--jsonl", "jsonl_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="JSONL file of {id, text} lines")
@click.option("--name", "names", multiple=True, help="a name the text is known to carry, e.g. the sender (repeatable)")
def pii_scan(jsonl_path: str | None, names: tuple[str, ...]) -> None:
    from .lib.guardrails import pii as detector

    if jsonl_path is None:
        click.echo(json.dumps(_spans_json(detector.detect(_stdin_text(), list(names)))))
        return
    bad = 0
    with click.open_file(jsonl_path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            rec, reason = _jsonl_record(raw)
            if rec is None:
                bad += 1
                click.echo(f"{jsonl_path}:{n}: {reason}; line skipped", err=True)
                continue
            spans = detector.detect(rec["text"], list(names) + rec.get("known_names", []))
            click.echo(json.dumps({"id": rec["id"], "spans": _spans_json(spans)}, ensure_ascii=False))
    if bad:
        click.echo(f"{jsonl_path}: {bad} bad line(s)", err=True)
        sys.exit(1)


@pii.command("redact", help="Print the text on stdin with every PII span replaced by <ENTITY_TYPE>.")
@click.option("--name", "names", multiple=True, help="a name the text is known to carry, e.g. the sender (repeatable)")
def pii_redact(names: tuple[str, ...]) -> None:
    from .lib.guardrails import pii as detector

    click.echo(detector.mask(_stdin_text(), list(names)).text, nl=False)


@main.command(help="Run every flow on the embedded default: seed each flow's inbox with its shipped samples, "
                   "train models none is promoted for, let each intake sensor micro-batch new sources into day "
                   "partitions, run them, run the ops jobs and write the KPI reports; one summary per flow. "
                   "Idempotent: a second run adds nothing.")
@click.option("--flow", "only", multiple=True, metavar="FLOW", help="run only these flows (repeatable)")
def demo(only: tuple[str, ...]) -> None:
    from .demo import run_demo

    specs = [flow_spec(n) for n in only] if only else list(all_flows().values())
    sys.exit(run_demo(_settings(), _dagster_home, specs, submit_paths))



def _register_groups() -> None:
    from .cli_governance import model, triage

    main.add_command(model)
    main.add_command(triage)
    from .cli_approvals import approve, reject, review

    main.add_command(approve)
    main.add_command(reject)
    main.add_command(review)


_register_groups()


if __name__ == "__main__":
    main()
