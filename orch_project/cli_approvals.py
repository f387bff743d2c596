"""`orch approve|reject|review`: human-in-the-loop decisions from the command line.

    orch approve ID --as USER [--reason TEXT] [--edit-file FILE]
    orch reject ID --as USER --reason TEXT
    orch review list [--json]

Decisions are role-checked against roster.yaml and audited (refusals too); the approval resume
sensor then delivers (approved) or closes (rejected) the item.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click



def _flow_of(item_id: str, flow: str | None):
    """The flow named by --flow; without it, the one flow with an approval (pending or decided) for ``item_id``."""
    from .cli import owning_flow
    from .lib.store import approvals

    return owning_flow(approvals, item_id, flow, f"no approval for item {item_id!r} in any flow; `orch review list` "
                                                 "shows the pending ones")


def _decide(item_id: str, decision: str, reviewer: str, reason: str, edited: str | None, flow: str | None) -> None:
    from .cli import open_db
    from .lib import approvals as hitl

    spec = _flow_of(item_id, flow)
    try:
        out = hitl.decide(open_db(), item_id, decision, reviewer, reason, edited, spec.config.roster,
                          flow=spec.name)
    except hitl.ApprovalError as exc:
        raise click.ClickException(str(exc))
    edit_label = spec.review.edit_label
    if out.get("needs_second_approval_by_role"):
        click.echo(f"{out['item_id']}: signed off by {out['decided_by']}"
                   + (f" with an edited {edit_label}" if out["edited"] else "")
                   + f"; it now needs a second approval by another person with role "
                     f"{out['needs_second_approval_by_role']!r} or above")
        return
    click.echo(f"{out['item_id']}: {out['status']} by {out['decided_by']}"
               + (f" with an edited {edit_label}" if out["edited"] else "")
               + "; the approval resume sensor picks it up on its next tick")


@click.command(help="Approve an item waiting for a human. Needs the approval's required role or above "
                    "(agent < lead < supervisor). --edit-file applies the reviewer's correction: the draft reply "
                    "(support, PII masked) or field corrections (documents: a YAML/JSON mapping field: value).")
@click.argument("item_id")
@click.option("--as", "reviewer", required=True, help="your roster id (e.g. a-ravi) or name")
@click.option("--reason", default="", help="why (recorded in the audit log)")
@click.option("--edit-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="a file with the correction (the flow's editable part: a reply's text, a document's fields)")
@click.option("--flow", "flow", default=None, metavar="FLOW", help="the item's flow (needed when ids collide)")
def approve(item_id: str, reviewer: str, reason: str, edit_file: Path | None, flow: str | None) -> None:
    edited = None
    if edit_file is not None:
        try:
            edited = edit_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise click.ClickException(f"{edit_file}: not UTF-8 text")
    _decide(item_id, "approve", reviewer, reason, edited, flow)


@click.command(help="Reject an item waiting for a human (terminal: nothing is sent). A reason is required.")
@click.argument("item_id")
@click.option("--as", "reviewer", required=True, help="your roster id (e.g. a-ravi) or name")
@click.option("--reason", required=True, help="why (recorded in the audit log)")
@click.option("--flow", "flow", default=None, metavar="FLOW", help="the item's flow (needed when ids collide)")
def reject(item_id: str, reviewer: str, reason: str, flow: str | None) -> None:
    _decide(item_id, "reject", reviewer, reason, None, flow)


@click.group(help="The approvals queue.")
def review() -> None:
    pass


@review.command("list", help="Pending approvals, earliest due first: item, reason, required role, due date, "
                             "overdue flag.")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--flow", "flow", default=None, metavar="FLOW", help="only this flow's approvals (default: every flow)")
def review_list(as_json: bool, flow: str | None) -> None:
    from .cli import flow_spec, open_db
    from .lib import approvals as hitl

    rows = hitl.pending(open_db(), flow_spec(flow).name if flow else None)

    def _iso(v):
        return v.isoformat() if isinstance(v, datetime) else v

    if as_json:
        click.echo(json.dumps([{k: _iso(v) for k, v in r.items()} for r in rows], indent=2, default=str))
        return
    if not rows:
        click.echo("no approvals pending")
        return
    for r in rows:
        due = r["due_at"].strftime("%Y-%m-%d %H:%M") if r["due_at"] else "-"
        flag = "  OVERDUE" if r["overdue"] else ""
        shown = "  ".join(f"{k} {v}" for k, v in r["fields"].items() if v is not None)
        click.echo(f"{r['flow']:<10} {r['item_id']:<28} {r['reason']:<15} needs {r['required_role']:<10} due {due}"
                   f"{flag}  {shown}")
