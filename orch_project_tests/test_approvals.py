"""Human in the loop as people use it: the flow materialised on a test instance puts items in the
approvals queue; reviewers decide through the `orch` CLI (subprocess) or the approval_decision_job
(Launchpad config); the resume and escalation sensors (build_sensor_context) move items on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from orch_project.defs.resources import default_resources
from orch_project.defs.support.logic import SupportConfig
from orch_project.lib import approvals as hitl
from orch_project.lib.connectors.embedded import messages, tickets
from orch_project.lib.pipeline import status_counts
from orch_project.lib.store import approvals, audit, items, outbox

from .conftest import QUIET, run_flow, sample_messages

DAY = "2026-11-20"
BIN = Path(sys.executable).parent
CFG = SupportConfig()
LEAD, AGENT, SUPERVISOR = "a-ravi", "a-ana", "a-elena"


def _connectors(orch_home):
    from orch_project.defs.resources import _embedded

    return _embedded(orch_home.connectors_url)


def _orch(orch_home, *args):
    env = {**os.environ, "ORCH_HOME": str(orch_home.home), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(BIN / "orch"), *args], capture_output=True, text=True, env=env, timeout=300)


def _flow_with_pending(db, defs, instance) -> list[str]:
    from orch_project.lib.intake import submit_to_table

    submit_to_table(db, "support", sample_messages(DAY), "test")
    assert run_flow(defs, instance, DAY).success
    ids = [r["item_id"] for r in hitl.pending(db, "support")]
    assert len(ids) >= 3, "the sample day puts several items in the approvals queue"
    return ids


def _decision_job(defs, instance, **config):
    return defs.resolve_job_def("support_approval_decision_job").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={**QUIET, "ops": {"support_apply_approval_decision": {"config": config}}})


def _tick(defs, instance, name):
    sensor = defs.get_sensor_def(name)
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
        return sensor.evaluate_tick(ctx)


def _run_requests(defs, instance, result):
    """Execute what a sensor tick requested, as the daemon would."""
    out = []
    for req in result.run_requests:
        job = defs.resolve_job_def(req.job_name or "support_approval_resume_job")
        out.append(job.execute_in_process(instance=instance, partition_key=req.partition_key, tags=req.tags,
                                          run_config=QUIET, raise_on_error=False))
    return out


def _approval(db, item_id):
    with db.begin() as conn:
        return dict(conn.execute(sa.select(approvals).where(approvals.c.item_id == item_id)).mappings().one())


def _item(db, item_id):
    with db.begin() as conn:
        return dict(conn.execute(sa.select(items).where(items.c.item_id == item_id)).mappings().one())


def _audit(db, item_id, action=None):
    with db.begin() as conn:
        q = sa.select(audit).where(audit.c.item_id == item_id).order_by(audit.c.id)
        if action:
            q = q.where(audit.c.action == action)
        return [dict(r) for r in conn.execute(q).mappings()]


def _tickets_for(orch_home, item_id):
    with _connectors(orch_home).db.begin() as conn:
        return conn.execute(sa.select(tickets).where(tickets.c.item_id == item_id)).all()


def test_review_list_and_unauthorised_decisions_are_refused_and_audited(orch_home, db, with_model, defs, instance):
    ids = _flow_with_pending(db, defs, instance)
    target = ids[0]

    listed = _orch(orch_home, "review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["item_id"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == set(ids)
    assert rows[target]["required_role"] == "lead" and rows[target]["due_at"] and "overdue" in rows[target]
    assert rows[target]["reason"] in ("high_priority", "low_confidence", "out_of_scope")
    human = _orch(orch_home, "review", "list")
    assert human.returncode == 0 and target in human.stdout and "needs lead" in human.stdout

    # an agent ranks below the required lead: refused, exit code != 0, message on stderr
    out = _orch(orch_home, "approve", target, "--as", AGENT, "--reason", "looks fine")
    assert out.returncode != 0
    assert "refused" in out.stderr and AGENT in out.stderr and "'lead'" in out.stderr
    # someone not in the roster
    out = _orch(orch_home, "approve", target, "--as", "mallory")
    assert out.returncode != 0 and "not in the roster" in out.stderr
    # an unknown item
    out = _orch(orch_home, "approve", "no-such-item", "--as", LEAD)
    assert out.returncode != 0 and "no approval for item" in out.stderr

    # the Launchpad path: the job run fails with the same clear message
    result = _decision_job(defs, instance, item_id=target, decision="approve", reviewer=AGENT, reason="ok")
    assert not result.success
    failure = result.failure_data_for_node("support_apply_approval_decision")
    assert "refused" in failure.user_failure_data.description
    assert "'lead'" in failure.user_failure_data.description

    refusals = _audit(db, target, "approval_refused")
    assert [r["actor"] for r in refusals] == [f"user:{AGENT}", "user:mallory", f"user:{AGENT}"]
    assert all(r["reason"].startswith("refused") for r in refusals)
    assert _approval(db, target)["status"] == "pending"
    assert _item(db, target)["status"] == "awaiting_approval"


def test_approval_resumes_the_item_and_delivers_it(orch_home, db, with_model, defs, instance):
    ids = _flow_with_pending(db, defs, instance)
    target, other = ids[0], ids[1]

    out = _orch(orch_home, "approve", target, "--as", LEAD, "--reason", "checked the account history")
    assert out.returncode == 0, out.stderr
    ap = _approval(db, target)
    assert (ap["status"], ap["decided_by"], ap["decision_reason"], ap["edited"]) == (
        "approved", LEAD, "checked the account history", False)
    assert ap["decided_at"] is not None
    # deciding does not advance the item, and waiting holds no run
    assert _item(db, target)["status"] == "awaiting_approval"
    assert not _tickets_for(orch_home, target)
    # a decision is final
    again = _orch(orch_home, "reject", target, "--as", SUPERVISOR, "--reason", "changed my mind")
    assert again.returncode != 0 and "already approved" in again.stderr

    tick = _tick(defs, instance, "support_approval_resume_sensor")
    assert [r.partition_key for r in tick.run_requests] == [DAY]
    assert tick.run_requests[0].run_key.startswith("support-approval-resume:")
    assert _item(db, target)["status"] == "approved"
    runs = _run_requests(defs, instance, tick)
    assert all(r.success for r in runs)

    item = _item(db, target)
    assert item["status"] == "resolved" and item["resolved_at"] is not None
    assert len(_tickets_for(orch_home, target)) == 1
    assert _item(db, other)["status"] == "awaiting_approval", "undecided items keep waiting"
    trail = [a["action"] for a in _audit(db, target) if not a["action"].startswith("effect_")]
    assert trail[-3:] == ["approval_approved", "approval_resumed", "completed"]  # completed: all effects delivered
    effects = sorted(a["action"] for a in _audit(db, target) if a["action"].startswith("effect_"))
    assert effects == ["effect_create_ticket", "effect_send_reply", "effect_send_survey",
                       "effect_support_interaction"]  # every side effect audited once
    decided = _audit(db, target, "approval_approved")[0]
    assert decided["actor"] == f"user:{LEAD}" and decided["inputs"]["required_role"] == "lead"
    assert decided["outputs"] == {"status": "approved", "edited": False}

    # nothing more to resume: no second run
    second = _tick(defs, instance, "support_approval_resume_sensor")
    assert not second.run_requests
    assert len(_tickets_for(orch_home, target)) == 1


def test_rejection_is_terminal(orch_home, db, with_model, defs, instance):
    ids = _flow_with_pending(db, defs, instance)
    target = ids[0]
    # a supervisor ranks above the required lead; decided through the Launchpad job
    result = _decision_job(defs, instance, item_id=target, decision="reject", reviewer=SUPERVISOR,
                           reason="customer already refunded by phone")
    assert result.success
    assert _approval(db, target)["status"] == "rejected"

    tick = _tick(defs, instance, "support_approval_resume_sensor")
    assert not tick.run_requests and "rejected" in tick.skip_message
    item = _item(db, target)
    assert item["status"] == "rejected" and item["stage"] == "approval_decision"
    assert [a["action"] for a in _audit(db, target)][-2:] == ["approval_rejected", "item_rejected"]

    # terminal: another run of the day, a later decision, the sensors change nothing and send nothing
    assert run_flow(defs, instance, DAY).success
    out = _orch(orch_home, "approve", target, "--as", SUPERVISOR)
    assert out.returncode != 0 and "already rejected" in out.stderr
    assert not _tick(defs, instance, "support_approval_resume_sensor").run_requests
    assert _item(db, target)["status"] == "rejected"
    assert not _tickets_for(orch_home, target)
    with db.begin() as conn:
        assert not conn.execute(sa.select(outbox).where(outbox.c.item_id == target)).all()

    st = status_counts(db, "support")
    assert st["states"]["rejected"] == 1 and st["lost"] == 0 and st["received"] == st["accounted"]
    assert st["terminal"] == st["states"].get("resolved", 0) + 1
    from orch_project.defs.support.flow import CFG
    from orch_project.defs.support.reporting import compute_kpis

    k, _ = compute_kpis(db, CFG)  # the KPI report shows the rejection; the flow's success rate ignores it
    assert k["rejected"] == 1 and k["success_rate"] == k["resolved"] / (k["resolved"] + k["dead_lettered"])


def test_overdue_approval_escalates_then_times_out(orch_home, db, with_model, defs, instance):
    ids = _flow_with_pending(db, defs, instance)
    target, later = ids[0], ids[1:]
    now = datetime.now(timezone.utc)
    # the target is due an hour ago, the rest far in the future
    with db.begin() as conn:
        conn.execute(approvals.update().where(approvals.c.item_id == target).values(due_at=now - timedelta(hours=1)))
        conn.execute(approvals.update().where(approvals.c.item_id.in_(later)).values(due_at=now + timedelta(days=30)))
    msgs_before = _connectors(orch_home).counts()["messages"]

    tick = _tick(defs, instance, "support_approval_escalation_sensor")
    assert "escalated 1" in tick.skip_message
    ap = _approval(db, target)
    assert ap["required_role"] == "supervisor" and ap["status"] == "pending"
    assert hitl.as_utc(ap["due_at"]) > now, "a new due date"
    esc = _audit(db, target, "approval_escalated")
    assert len(esc) == 1 and esc[0]["outputs"]["to_role"] == "supervisor" and esc[0]["inputs"]["from_role"] == "lead"
    with db.begin() as conn:
        alert = conn.execute(sa.select(outbox).where(outbox.c.item_id == target,
                                                     outbox.c.connector == "messaging")).mappings().one()
    assert alert["status"] == "delivered" and alert["payload"]["kind"] == "escalation"
    assert alert["payload"]["recipient"] == f"role:supervisor:{SUPERVISOR}"
    assert _connectors(orch_home).counts()["messages"] == msgs_before + 1
    assert _item(db, target)["escalation_level"] == 1
    # the lead may no longer decide; the supervisor may
    assert _orch(orch_home, "approve", target, "--as", LEAD).returncode != 0
    # a second tick escalates nobody again
    assert "no overdue approvals" in _tick(defs, instance, "support_approval_escalation_sensor").skip_message

    # later (a `now` in the future): the others escalate; with on_timeout=reject the target, already at the
    # top role and past its new due date, is auto-rejected and then closed by the resume sensor
    future = now + timedelta(days=60)
    default = hitl.escalate_overdue(db, "support", CFG.brief.approval, CFG.roster, CFG.brief.sla_hours,
                                    _connectors(orch_home), now=future)
    assert CFG.brief.approval.on_timeout == "escalate"
    assert sorted(default.escalated) == sorted(later) and not default.auto_rejected
    assert all(_approval(db, i)["required_role"] == "supervisor" for i in later)
    strict = CFG.brief.approval.model_copy(update={"on_timeout": "reject"})
    rep = hitl.escalate_overdue(db, "support", strict, CFG.roster, CFG.brief.sla_hours, _connectors(orch_home),
                                now=future + timedelta(days=10))
    assert sorted(rep.auto_rejected) == sorted(ids) and not rep.escalated
    ap = _approval(db, target)
    assert ap["status"] == "rejected" and ap["decided_by"] == hitl.TIMEOUT_ACTOR
    assert _audit(db, target, "approval_rejected")[0]["actor"] == hitl.TIMEOUT_ACTOR
    assert not _tick(defs, instance, "support_approval_resume_sensor").run_requests
    assert _item(db, target)["status"] == "rejected"


def test_edited_draft_is_recorded_masked_and_counted_in_the_override_rate(orch_home, db, with_model, defs,
                                                                         instance, tmp_path):
    ids = _flow_with_pending(db, defs, instance)
    edited_id, plain_id = ids[0], ids[1]
    original = _item(db, edited_id)["data"]["draft"]
    edit = tmp_path / "reply.txt"
    edit.write_text("Hello, we have reversed the duplicate charge. Questions? Write to jane.doe@example.com.\n")

    out = _orch(orch_home, "approve", edited_id, "--as", LEAD, "--reason", "tone", "--edit-file", str(edit))
    assert out.returncode == 0, out.stderr
    assert _orch(orch_home, "approve", plain_id, "--as", "Grace Okafor").returncode == 0  # by name works too

    assert _approval(db, edited_id)["edited"] is True and _approval(db, plain_id)["edited"] is False
    data = _item(db, edited_id)["data"]
    assert "reversed the duplicate charge" in data["draft"]
    assert "jane.doe@example.com" not in data["draft"] and "<EMAIL_ADDRESS>" in data["draft"]
    assert data["draft_edited_by"] == LEAD
    row = _audit(db, edited_id, "approval_approved")[0]
    assert row["inputs"]["original_draft"] == original
    assert row["outputs"]["edited"] is True and row["reason"] == "tone"
    assert "jane.doe@example.com" not in json.dumps(row, default=str)

    from orch_project.defs.support.reporting import compute_kpis

    kpis, _ = compute_kpis(db, CFG)
    assert kpis["override_rate"] == 0.5  # 1 edited of 2 decided

    # the customer gets the edited (masked) reply
    assert all(r.success for r in _run_requests(defs, instance, _tick(defs, instance, "support_approval_resume_sensor")))
    with _connectors(orch_home).db.begin() as conn:
        body = conn.execute(sa.select(messages.c.body).where(messages.c.item_id == edited_id,
                                                             messages.c.kind == "reply")).scalar_one()
    assert body == data["draft"]
