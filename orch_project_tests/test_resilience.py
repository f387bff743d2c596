"""Failure design: connector outages behind circuit breakers, self-healing redelivery, compensation of
half-done multi-step effects, and alerts from the brief (metric sensor + run-failure sensor) delivered
to the messaging connector, a Slack webhook stub and an SMTP stub."""

from __future__ import annotations

import json
import socketserver
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest
import sqlalchemy as sa

from orch_project.defs.resources import _embedded, default_resources
from orch_project.defs.support.flow import CFG
from orch_project.lib.connectors.embedded import messages, tickets
from orch_project.lib.connectors.policy import AlertPolicy, ConnectorPolicy
from orch_project.lib.intake import submit_to_table
from orch_project.lib.llm.routing import BreakerPolicy
from orch_project.lib.store import alerts, audit, circuit_breakers, dlq, items, outbox, utcnow

from .conftest import run_flow, run_ops, sample_messages

DAY = "2026-11-20"


def _policy(monkeypatch, **kw) -> ConnectorPolicy:
    breaker = kw.pop("breaker", {})
    policy = ConnectorPolicy(circuit_breaker=BreakerPolicy(**{"failure_threshold": 1, "cooldown_s": 3600.0,
                                                              **breaker}), **kw)
    monkeypatch.setitem(CFG.__dict__, "connector_policy", policy)
    return policy


def _statuses(db) -> dict[str, int]:
    with db.begin() as conn:
        return dict(conn.execute(sa.select(items.c.status, sa.func.count()).group_by(items.c.status)).all())


def _outbox(db, action: str) -> list[dict]:
    with db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(outbox).where(outbox.c.action == action)).mappings()]


def _breaker(db, key: str) -> dict | None:
    with db.begin() as conn:
        r = conn.execute(sa.select(circuit_breakers).where(circuit_breakers.c.key == key)).mappings().first()
    return dict(r) if r else None


def test_outage_waits_then_recovery_delivers_exactly_once(orch_home, db, with_model, defs, instance, monkeypatch):
    _policy(monkeypatch, max_attempts=5)
    conn_ = _embedded(orch_home.connectors_url)
    submit_to_table(db, "support", sample_messages(DAY), "test")
    conn_.set_fault("crm")  # CRM down until cleared

    result = run_flow(defs, instance, DAY)
    assert result.success, "a connector outage does not fail the batch"
    st = _statuses(db)
    assert st.get("resolved", 0) == 0 and st.get("approved", 0) > 0
    approved = st["approved"]
    crm = _outbox(db, "support_interaction")
    assert len(crm) == approved and {r["status"] for r in crm} == {"failed"}
    assert all(r["attempts"] == 1 and "unavailable" in r["last_error"] for r in crm)
    assert {r["status"] for r in _outbox(db, "create_ticket")} == {"delivered"}  # other connectors unaffected
    assert _breaker(db, "connector:crm")["state"] == "open"
    assert conn_.counts()["crm_activities"] == 0

    # still down, circuit open: the ops job's redelivery does not call the broken connector
    assert run_ops(defs, instance).success
    assert all(r["attempts"] == 1 for r in _outbox(db, "support_interaction"))
    assert _statuses(db).get("resolved", 0) == 0

    # the connector recovers and the cool-down passes: the half-open probe succeeds and heals everything
    conn_.clear_fault("crm")
    with db.begin() as conn:
        conn.execute(circuit_breakers.update().where(circuit_breakers.c.key == "connector:crm")
                     .values(opened_at=utcnow() - timedelta(hours=2)))
    assert run_ops(defs, instance).success
    st = _statuses(db)
    assert st.get("resolved", 0) == approved and st.get("approved", 0) == 0
    assert {r["status"] for r in _outbox(db, "support_interaction")} == {"delivered"}
    assert _breaker(db, "connector:crm")["state"] == "closed"
    counts = conn_.counts()
    assert counts["crm_activities"] == counts["tickets"] == approved
    with conn_.db.begin() as conn:
        kinds = dict(conn.execute(sa.select(messages.c.kind, sa.func.count()).group_by(messages.c.kind)).all())
    assert kinds["reply"] == kinds["survey"] == approved  # once each
    assert all(v == 0 for v in conn_.duplicates().values())
    with db.begin() as conn:
        completed = conn.execute(sa.select(sa.func.count()).select_from(audit)
                                 .where(audit.c.action == "completed")).scalar_one()
    assert completed == approved
    # a further flow and ops run adds nothing
    assert run_flow(defs, instance, DAY).success and run_ops(defs, instance).success
    assert conn_.counts() == counts


def test_permanent_crm_failure_compensates_by_voiding_the_ticket(orch_home, db, with_model, defs, instance,
                                                                 monkeypatch):
    _policy(monkeypatch, max_attempts=2, breaker={"failure_threshold": 100})
    conn_ = _embedded(orch_home.connectors_url)
    submit_to_table(db, "support", sample_messages(DAY), "test")
    conn_.set_fault("crm")
    assert run_flow(defs, instance, DAY).success
    approved = _statuses(db)["approved"]
    ops = run_ops(defs, instance)  # second attempt fails too: failed for good -> compensate
    assert ops.success

    st = _statuses(db)
    assert st.get("approved", 0) == 0 and st.get("resolved", 0) == 0
    assert st["dead_lettered"] == approved
    with conn_.db.begin() as conn:
        ticket_states = dict(conn.execute(sa.select(tickets.c.status, sa.func.count()).group_by(tickets.c.status)).all())
    assert ticket_states == {"voided": approved}
    voids = _outbox(db, "void_ticket")
    assert len(voids) == approved and {v["status"] for v in voids} == {"delivered"}
    assert all(v["idempotency_key"].endswith(":compensate_ticket") for v in voids)
    assert {r["status"] for r in _outbox(db, "support_interaction")} == {"dead"}
    with db.begin() as conn:
        comp = [dict(r) for r in conn.execute(sa.select(audit).where(audit.c.action == "compensated")).mappings()]
        completed = conn.execute(sa.select(sa.func.count()).select_from(audit)
                                 .where(audit.c.action == "completed")).scalar_one()
        dead = [dict(r) for r in conn.execute(sa.select(dlq).where(dlq.c.stage == "actions")).mappings()]
    assert len(comp) == approved and completed == 0
    assert comp[0]["outputs"]["compensated"] == ["ticket:void_ticket"]
    assert comp[0]["outputs"]["left_in_place"] == ["reply"]
    assert len(dead) == approved and {d["error_type"] for d in dead} == {"effect_failed"}
    # the same ops run's DLQ backlog already counts them (it runs after the redelivery)
    assert ops.asset_materializations_for_node("support_dlq_backlog")[0].metadata["dlq_open"].value == approved
    assert "(crm support_interaction) failed" in dead[0]["reason"] and "ticket:void_ticket" in dead[0]["reason"]
    # compensation is idempotent: more runs change nothing, even after the CRM comes back
    conn_.clear_fault("crm")
    assert run_ops(defs, instance).success
    assert len(_outbox(db, "void_ticket")) == approved
    assert conn_.counts()["crm_activities"] == 0

    # a replay waits until the compensation is delivered (a new ticket must not meet one still to be voided)
    from orch_project.lib.dlq import replay, replay_all

    void_key = voids[0]["idempotency_key"]
    with db.begin() as conn:
        conn.execute(outbox.update().where(outbox.c.idempotency_key == void_key).values(status="failed"))
    waiting = replay(db, dead[0]["id"], actor="test")
    assert not waiting["replayed"] and "compensation is not delivered yet" in waiting["message"]
    with db.begin() as conn:
        conn.execute(outbox.update().where(outbox.c.idempotency_key == void_key).values(status="delivered"))

    # with the CRM back, replaying the dead letters finishes the items: a new ticket (the voided one
    # stays voided) and the CRM log under its own key; the reply, already sent, is not sent again
    assert replay_all(db, "support", actor="test")["replayed"] == approved
    assert run_flow(defs, instance, DAY).success
    st = _statuses(db)
    assert st["resolved"] == approved and st.get("dead_lettered", 0) == 0
    with conn_.db.begin() as conn:
        ticket_states = dict(conn.execute(sa.select(tickets.c.status, sa.func.count()).group_by(tickets.c.status)).all())
        kinds = dict(conn.execute(sa.select(messages.c.kind, sa.func.count()).group_by(messages.c.kind)).all())
    assert ticket_states == {"voided": approved, "solved": approved}
    assert conn_.counts()["crm_activities"] == approved and kinds["reply"] == approved
    assert all(v == 0 for v in conn_.duplicates().values())
    assert {r["idempotency_key"].rsplit(":", 1)[1] for r in _outbox(db, "create_ticket")} == {"ticket", "ticket#1"}
    with db.begin() as conn:
        data = conn.execute(sa.select(items.c.data).where(items.c.item_id == comp[0]["item_id"])).scalar_one()
    assert data["effect_generation"] == {"ticket": 1} and "compensation" not in data
    assert data["compensation_history"][0]["compensated"] == ["ticket:void_ticket"]
    assert {(r["idempotency_key"].rsplit(":", 1)[1], r["status"]) for r in _outbox(db, "support_interaction")} \
        == {("crm_log", "delivered")}


def test_replay_after_a_failure_with_nothing_to_undo_delivers_the_failed_and_cancelled_steps(
        orch_home, db, with_model, defs, instance, monkeypatch):
    """Ticketing fails for good while the CRM's circuit is open: the ticket is dead, the CRM log
    cancelled, the reply stays. After the outage a replay delivers ticket and CRM log once each."""
    _policy(monkeypatch, max_attempts=2)  # a circuit opens on the first failure, for an hour
    conn_ = _embedded(orch_home.connectors_url)
    submit_to_table(db, "support", sample_messages(DAY), "test")
    conn_.set_fault("ticketing")
    conn_.set_fault("crm")
    assert run_flow(defs, instance, DAY).success
    approved = _statuses(db)["approved"]

    def hour_later(key):  # the circuit's cool-down has passed: the next call is a half-open probe
        with db.begin() as conn:
            conn.execute(circuit_breakers.update().where(circuit_breakers.c.key == key)
                         .values(opened_at=utcnow() - timedelta(hours=2)))

    hour_later("connector:ticketing")
    assert run_ops(defs, instance).success  # the probe fails too: the ticket failed for good
    dead = _statuses(db)["dead_lettered"]  # the first batch; the circuit opened again for the rest
    assert 0 < dead <= approved
    with db.begin() as conn:
        comp = conn.execute(sa.select(items.c.data).where(items.c.status == "dead_lettered")).scalars().first()[
            "compensation"]
    assert (comp["failed"], comp["compensated"], comp["cancelled"], comp["left_in_place"]) == (
        ["ticket"], [], ["crm_log"], ["reply"])

    # one record as an earlier version wrote it (no compensation keys): replay relies on the actions stage,
    # which puts an approved item's dead or cancelled effects back into delivery
    with db.begin() as conn:
        iid, data = conn.execute(sa.select(items.c.item_id, items.c.data)
                                 .where(items.c.status == "dead_lettered")).first()
        old = {k: v for k, v in data["compensation"].items() if k not in ("retry_keys", "compensation_keys")}
        conn.execute(items.update().where(items.c.item_id == iid).values(data={**data, "compensation": old}))

    conn_.clear_fault()
    hour_later("connector:ticketing")
    hour_later("connector:crm")
    from orch_project.lib.dlq import replay_all

    assert replay_all(db, "support", actor="test")["replayed"] == dead
    assert run_flow(defs, instance, DAY).success
    assert _statuses(db).get("resolved", 0) == approved
    counts = conn_.counts()
    with conn_.db.begin() as conn:
        kinds = dict(conn.execute(sa.select(messages.c.kind, sa.func.count()).group_by(messages.c.kind)).all())
    assert counts["tickets"] == counts["crm_activities"] == kinds["reply"] == approved
    assert all(v == 0 for v in conn_.duplicates().values())
    assert {r["status"] for r in _outbox(db, "create_ticket") + _outbox(db, "support_interaction")} == {"delivered"}


# --- alert channel stubs -------------------------------------------------------------------------

class _SlackStub:
    def __init__(self):
        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T000/B000"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _SmtpStub:
    """Just enough SMTP (HELO/EHLO, MAIL, RCPT, DATA, QUIT) to receive a message."""

    def __init__(self):
        mails = self.mails = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"220 stub ESMTP\r\n")
                env = {"rcpt": []}
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    cmd = line.decode("ascii", "replace").strip()
                    verb = cmd.split(" ", 1)[0].upper()
                    if verb in ("EHLO", "HELO"):
                        self.wfile.write(b"250 stub\r\n")
                    elif verb == "MAIL":
                        env["from"] = cmd
                        self.wfile.write(b"250 OK\r\n")
                    elif verb == "RCPT":
                        env["rcpt"].append(cmd)
                        self.wfile.write(b"250 OK\r\n")
                    elif verb == "DATA":
                        self.wfile.write(b"354 go ahead\r\n")
                        data = []
                        while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                            data.append(chunk)
                        mails.append({**env, "data": b"".join(data).decode("utf-8", "replace")})
                        self.wfile.write(b"250 queued\r\n")
                    elif verb == "QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 OK\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def channels(monkeypatch):
    slack, smtp = _SlackStub(), _SmtpStub()
    monkeypatch.setenv("ORCH_ALERT_SLACK_WEBHOOK", slack.url)
    monkeypatch.setenv("ORCH_ALERT_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("ORCH_ALERT_SMTP_PORT", str(smtp.port))
    monkeypatch.setenv("ORCH_ALERT_SMTP_FROM", "orch@example.test")
    monkeypatch.setenv("ORCH_ALERT_SMTP_TO", "oncall@example.test")
    yield slack, smtp
    slack.close()
    smtp.close()


def _low_dlq_threshold(monkeypatch):
    brief = CFG.brief.model_copy(update={"alerts": ["dlq_backlog>2", "error_rate>50%"]})
    monkeypatch.setitem(CFG.__dict__, "brief", brief)


def _alert_messages(orch_home) -> list[dict]:
    c = _embedded(orch_home.connectors_url)
    with c.db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(messages).where(messages.c.kind == "alert")).mappings()]


def test_dlq_backlog_alert_raised_once_per_window(orch_home, db, defs, instance, monkeypatch, channels):
    support_alerts_sensor = defs.get_sensor_def("support_alerts_sensor")

    slack, smtp = channels
    _policy(monkeypatch, alerts=AlertPolicy(window_s=3600))
    _low_dlq_threshold(monkeypatch)
    now = utcnow()
    with db.begin() as conn:
        conn.execute(dlq.insert(), [{"flow": "support", "item_id": f"x{i}", "stage": "triage",
                                     "error_type": "schema", "reason": "test", "replay": {}, "status": "open",
                                     "created_at": now} for i in range(3)])
    for _ in range(3):  # three daemon ticks in the same window
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
            out = support_alerts_sensor(ctx)
        assert isinstance(out, dg.SkipReason)
    with db.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(alerts)).mappings()]
    assert [r["rule"] for r in rows] == ["dlq_backlog>2"]  # error_rate has no finished items: not breached
    assert rows[0]["observed"] == 3.0 and rows[0]["channels"] == {"messaging": "delivered", "slack": "delivered",
                                                                  "smtp": "delivered"}
    assert len(slack.posts) == 1 and "dlq_backlog>2" in slack.posts[0]["text"]
    assert len(smtp.mails) == 1 and "oncall@example.test" in smtp.mails[0]["rcpt"][0]
    assert "dlq_backlog" in smtp.mails[0]["data"]
    assert len(_alert_messages(orch_home)) == 1
    log = (orch_home.logs_dir / "orch.jsonl").read_text().splitlines()
    assert sum(1 for line in log if json.loads(line)["event"] == "alert_raised") == 1


def test_run_failure_sensor_raises_an_alert_once(orch_home, db, defs, instance, monkeypatch, channels):
    support_run_failure_alerts = defs.get_sensor_def("support_run_failure_alerts")

    slack, _ = channels

    @dg.op
    def boom():
        raise RuntimeError("simulated stage failure")

    @dg.job
    def failing_job():
        boom()

    result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    event = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
                                         ).records[0].event_log_entry.dagster_event
    for _ in range(2):
        ctx = dg.build_run_status_sensor_context(
            sensor_name="support_run_failure_alerts", dagster_event=event, dagster_instance=instance,
            dagster_run=run, resources=default_resources()).for_run_failure()
        support_run_failure_alerts(ctx)
    with db.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(alerts)).mappings()]
    assert [r["rule"] for r in rows] == ["run_failure"]
    assert result.run_id in rows[0]["message"] and "failing_job" in rows[0]["message"]
    assert rows[0]["channels"]["messaging"] == "delivered" and rows[0]["channels"]["slack"] == "delivered"
    assert len(slack.posts) == 1
    assert len(_alert_messages(orch_home)) == 1
