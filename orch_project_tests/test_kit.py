"""The flow kit itself: a two-stage flow defined here yields its assets, checks, sensors and jobs with the
flow's name on each and the right deps, runs end to end on ``instance_for_test()``, and two flows that
receive an item with the same id and a file with the same name each keep their own."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

import sqlalchemy as sa

from orch_project.kit import build_flow
from orch_project.lib.connectors.embedded import Effect, System, cmeta
from orch_project.lib.flows import FlowConfig, FlowSpec, IntakeSpec, Stage
from orch_project.lib.intake import Accepted
from orch_project.lib.pipeline import ItemUpdate, StageSpecError, commit_stage, load_stage_items, status_counts
from orch_project.lib.saga import run_effects_stage, step_key
from orch_project.lib.store import utcnow

from .conftest import QUIET

# A system the test flows bring themselves, reached through the same deliver() as the platform's.
NOTES = sa.Table("kit_test_notes", cmeta,
                 sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                 sa.Column("idempotency_key", sa.String(512), nullable=False, unique=True),
                 sa.Column("item_id", sa.String(255), nullable=False), sa.Column("trace_id", sa.String(32)),
                 sa.Column("words", sa.Integer, nullable=False))
NOTES_SYSTEM = System("kit_notes", NOTES, lambda e, now: {"idempotency_key": e.idempotency_key, "item_id": e.item_id,
                                                          "trace_id": e.trace_id, "words": e.payload["words"]})

BRIEF = {"flow_name": "kit_test", "inputs": ["file"], "slo": {"p95_latency_sec": 60, "success_rate": 0.98},
         "kpis": ["words"], "guardrails": ["schema_validation"], "human_in_loop": [], "alerts": ["dlq_backlog>5"],
         "budget": {"max_tokens_per_run": 1000, "daily_token_cap": 10000}}


def _to_item(raw: dict, ctx) -> Accepted:
    if not isinstance(raw.get("id"), str) or not isinstance(raw.get("text"), str):
        raise ValueError("id and text must be strings")
    return Accepted(item_id=raw["id"], data={"text": raw["text"]}, channel="file")


def _score(env, cfg):
    started = utcnow()
    rows = load_stage_items(env, "score")
    updates = [ItemUpdate(r["item_id"], "scored", {**r["data"], "words": len(r["data"]["text"].split())})
               for r in rows]
    return commit_stage(env, "score", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows})


def _notify(env, cfg, connectors):
    rows = load_stage_items(env, "notify")

    def plan(r):
        return {"note": Effect(step_key(env.flow, r, "note"), "kit_notes", "record_note", r["item_id"],
                               r["trace_id"], {"words": r["data"]["words"]})}

    return run_effects_stage(env, "notify", rows, connectors, plan=plan, compensations={},
                             policy=cfg.connector_policy, done_status="resolved", done_reason="note delivered")


def make_spec(name: str, folder: Path) -> FlowSpec:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "brief.yaml").write_text(yaml.safe_dump(BRIEF))
    return FlowSpec(
        name=name, folder=folder, title=f"Kit test {name}", config=FlowConfig(folder),
        intake=IntakeSpec(to_item=_to_item, suffixes=(".json",)),
        stages=[Stage("score", loads="received", sets="scored", fn=_score),
                Stage("notify", loads="scored", sets="resolved", fn=_notify, kind="connector", waits=True)],
        effects=frozenset({("kit_notes", "record_note")}), systems=(NOTES_SYSTEM,))


@pytest.fixture
def two_flows(tmp_path):
    from orch_project.lib import flows

    yield make_spec("kit_alpha", tmp_path / "alpha"), make_spec("kit_beta", tmp_path / "beta")
    for name in ("kit_alpha", "kit_beta", "kit_bad"):
        flows.unregister(name)  # the test flows and their system leave the process as they came


def test_spec_derives_chain_statuses_and_replay_targets(two_flows):
    spec, _ = two_flows
    assert spec.stage_names == ("intake", "score", "notify")
    assert spec.open_statuses == ("received", "scored")
    assert spec.waiting_statuses == ()
    assert spec.replay_targets == {"score": ("received", "intake"), "notify": ("scored", "score")}
    assert spec.allowed_effects == {("kit_notes", "record_note"), ("messaging", "send_alert")}
    with pytest.raises(ValueError, match="not among the flow's effects"):
        FlowSpec(name="kit_bad", folder=spec.folder, title="bad", config=spec.config, intake=spec.intake,
                 stages=spec.stages, compensations={"note": ("messaging", "recall")})


def test_kit_builds_named_objects_with_deps(two_flows):
    spec, _ = two_flows
    defs = dg.Definitions.merge(build_flow(spec), dg.Definitions(resources=_resources()))
    keys = {a.key.to_user_string() for a in defs.resolve_all_asset_specs()}
    assert keys == {"kit_alpha_intake", "kit_alpha_score", "kit_alpha_notify", "kit_alpha_escalations",
                    "kit_alpha_dlq_backlog", "kit_alpha_kpi_report", "kit_alpha_raw_retention"}
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["kit_alpha_score"] == {"kit_alpha_intake"}
    assert parents["kit_alpha_notify"] == {"kit_alpha_score"}
    assert "kit_alpha_escalations" in parents["kit_alpha_kpi_report"]
    assert isinstance(graph.get(dg.AssetKey("kit_alpha_score")).partitions_def, dg.DailyPartitionsDefinition)
    assets = {a.key.to_user_string(): a for a in defs.assets}
    assert assets["kit_alpha_notify"].op.retry_policy is not None  # a connector stage retries with backoff
    assert assets["kit_alpha_score"].op.retry_policy is None
    checks = {k.name for k in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"intake_nothing_lost", "intake_pii_masked", "notify_no_duplicate_effects"}
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"kit_alpha_flow_job", "kit_alpha_ops_job",
                                                             "kit_alpha_dlq_replay_job",
                                                             "kit_alpha_retention_purge_job"}
    # no stage waits for a person: no approval jobs or sensors
    assert {s.name for s in defs.sensors} == {"kit_alpha_intake_sensor", "kit_alpha_ops_after_flow",
                                              "kit_alpha_alerts_sensor", "kit_alpha_run_failure_alerts"}
    assert {s.name for s in defs.schedules} == {"kit_alpha_ops_job_schedule",
                                                "kit_alpha_retention_purge_job_schedule"}
    # every name carries the flow, so two flows load side by side
    dg.Definitions.validate_loadable(dg.Definitions.merge(defs, build_flow(two_flows[1])))


def _resources():
    from orch_project.defs.resources import default_resources

    return default_resources()


def _tick(defs, instance, name):
    sensor = defs.get_sensor_def(f"{name}_intake_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=_resources()) as ctx:
        return sensor.evaluate_tick(ctx)


def test_two_flows_same_id_and_file_name_both_kept(orch_home, db, instance, two_flows):
    from orch_project.lib.intake import drop_file, submit_to_table
    from orch_project.lib.store import intake, items

    alpha, beta = two_flows
    defs = dg.Definitions.merge(build_flow(alpha), build_flow(beta), dg.Definitions(resources=_resources()))
    day = utcnow().date().isoformat()
    for spec, text in ((alpha, "alpha says hello world"), (beta, "beta speaks")):
        assert drop_file(spec.inbox_dir(orch_home.inbox_dir), "same.json",
                         json.dumps({"id": "same-1", "text": text}).encode())
        assert submit_to_table(db, spec.name, [{"id": "row-1", "text": f"{spec.name} row"}], "test") == 1
    drop_file(alpha.inbox_dir(orch_home.inbox_dir), "bad.json", b'{"id": 5}')  # invalid: to the DLQ
    for spec in (alpha, beta):
        tick = _tick(defs, instance, spec.name)
        assert [r.partition_key for r in tick.run_requests] == [day]
        res = defs.resolve_job_def(f"{spec.name}_flow_job").execute_in_process(
            instance=instance, partition_key=day, run_config=QUIET, raise_on_error=False)
        assert res.success
        checks = {e.asset_check_key.name: e.passed for e in res.get_asset_check_evaluations()}
        assert checks == {"intake_nothing_lost": True, "intake_pii_masked": True, "notify_no_duplicate_effects": True}
    with db.begin() as conn:
        got = {(f, i): (st, d["text"], d["words"]) for f, i, st, d in conn.execute(
            sa.select(items.c.flow, items.c.item_id, items.c.status, items.c.data))}
        logged = sorted(conn.execute(sa.select(intake.c.flow, intake.c.source_key, intake.c.outcome)).all())
    assert got[("kit_alpha", "same-1")] == ("resolved", "alpha says hello world", 4)
    assert got[("kit_beta", "same-1")] == ("resolved", "beta speaks", 2)
    assert got[("kit_alpha", "row-1")][0] == got[("kit_beta", "row-1")][0] == "resolved"
    assert ("kit_alpha", "file:same.json", "accepted") in logged and ("kit_beta", "file:same.json", "accepted") in logged
    assert ("kit_alpha", "file:bad.json", "dead_lettered") in logged
    a, b = status_counts(db, "kit_alpha"), status_counts(db, "kit_beta")
    assert (a["received"], a["lost"], a["states"]["resolved"], a["states"]["dead_lettered"]) == (3, 0, 2, 1)
    assert (b["received"], b["lost"], b["states"]["resolved"]) == (2, 0, 2)
    from orch_project.defs.resources import _embedded

    with _embedded(orch_home.connectors_url).db.begin() as conn:
        notes = conn.execute(sa.select(NOTES.c.idempotency_key)).scalars()
        assert sorted(notes) == ["kit_alpha:row-1:note", "kit_alpha:same-1:note", "kit_beta:row-1:note",
                                 "kit_beta:same-1:note"]
    ops = defs.resolve_job_def("kit_alpha_ops_job").execute_in_process(instance=instance, run_config=QUIET,
                                                                       raise_on_error=False)
    assert ops.success
    backlog = ops.asset_materializations_for_node("kit_alpha_dlq_backlog")[0].metadata
    assert backlog["dlq_open"].value == 1


def test_stage_held_to_its_spec(orch_home, db, two_flows):
    from orch_project.lib.intake import run_intake
    from orch_project.lib.pipeline import StageEnv

    alpha, _ = two_flows
    day = utcnow().date().isoformat()
    from orch_project.lib.intake import submit_to_table

    submit_to_table(db, alpha.name, [{"id": "x-1", "text": "one two"}], "test")
    env = StageEnv(db, alpha.name, [day], spec=alpha)
    run_intake(env, alpha, None, "salt")
    rows = load_stage_items(env, "score")
    assert [r["item_id"] for r in rows] == ["x-1"]
    with pytest.raises(StageSpecError, match="outside its spec"):
        commit_stage(env, "score", utcnow(), [ItemUpdate("x-1", "resolved", rows[0]["data"])],
                     trace_ids={"x-1": rows[0]["trace_id"]})
    assert status_counts(db, alpha.name)["states"] == {"dead_lettered": 0, "duplicate": 0, "received": 1}


def test_registry_discovers_flow_folders_and_resolves_names():
    from orch_project.kit.registry import discover, resolve

    found = discover()
    assert "support" in found and all(spec.name == name for name, spec in found.items())
    assert resolve("support") is found["support"]
    if len(found) == 1:
        assert resolve(None) is found["support"]  # the only flow needs no --flow
    else:
        with pytest.raises(KeyError, match="choose one with --flow"):
            resolve(None)
    with pytest.raises(KeyError, match="no flow 'nope'; flows: .*support"):
        resolve("nope")


def _review(env, cfg):
    """Long texts wait for a person (branch ``needs_review``), short ones are validated."""
    started = utcnow()
    rows = load_stage_items(env, "review")
    updates, approval_rows = [], []
    for r in rows:
        if r["data"]["words"] > 2:
            updates.append(ItemUpdate(r["item_id"], "needs_review", r["data"], "routed"))
            approval_rows.append({"flow": env.flow, "item_id": r["item_id"], "reason": "long", "required_role": "lead",
                                  "status": "pending", "due_at": None, "created_at": started, "edited": False})
        else:
            updates.append(ItemUpdate(r["item_id"], "validated", r["data"]))
    return commit_stage(env, "review", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        approval_rows=approval_rows)


def test_a_gate_of_another_shape_gets_approval_jobs_and_resumes(orch_home, db, instance, tmp_path):
    """A flow whose gate sets ``validated`` and waits in ``needs_review``: the kit builds its approval
    decision/resume jobs and sensors, and a person's approval moves the item on to the next stage."""
    from orch_project.lib import approvals as hitl
    from orch_project.lib import flows
    from orch_project.lib.intake import submit_to_table

    folder = tmp_path / "gamma"
    base = make_spec("kit_gamma", folder)
    (folder / "roster.yaml").write_text(yaml.safe_dump({"people": [{"id": "l-lee", "name": "Lee", "role": "lead"}]}))
    spec = FlowSpec(name="kit_gamma", folder=folder, title="Kit test gamma", config=FlowConfig(folder),
                    intake=base.intake, effects=base.effects, systems=base.systems,
                    stages=[base.stages[0],
                            Stage("review", loads="scored", sets="validated", branches=("needs_review",), fn=_review),
                            Stage("notify", loads="validated", sets="resolved", fn=_notify, kind="connector",
                                  waits=True)])
    try:
        assert spec.open_statuses == ("received", "scored", "validated", "needs_review")
        assert spec.waiting_statuses == ("needs_review",) and hitl.gate_statuses("kit_gamma") == (
            "needs_review", "validated", "notify")
        defs = dg.Definitions.merge(build_flow(spec), dg.Definitions(resources=_resources()))
        assert {"kit_gamma_approval_decision_job", "kit_gamma_approval_resume_job"} <= {
            j.name for j in defs.resolve_all_job_defs()}
        assert {"kit_gamma_approval_resume_sensor", "kit_gamma_approval_escalation_sensor"} <= {
            s.name for s in defs.sensors}
        day = utcnow().date().isoformat()
        submit_to_table(db, "kit_gamma", [{"id": "g-short", "text": "two words"},
                                          {"id": "g-long", "text": "this one is long"}], "test")
        res = defs.resolve_job_def("kit_gamma_flow_job").execute_in_process(
            instance=instance, partition_key=day, run_config=QUIET, raise_on_error=False)
        assert res.success
        st = status_counts(db, "kit_gamma")["states"]
        assert (st.get("resolved"), st.get("needs_review")) == (1, 1)
        assert [r["item_id"] for r in hitl.pending(db, "kit_gamma")] == ["g-long"]
        hitl.decide(db, "g-long", "approve", "l-lee", "fine", None, spec.config.roster, flow="kit_gamma")
        sensor = defs.get_sensor_def("kit_gamma_approval_resume_sensor")
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=_resources()) as ctx:
            tick = sensor.evaluate_tick(ctx)
        assert [r.partition_key for r in tick.run_requests] == [day]
        resume = defs.resolve_job_def("kit_gamma_approval_resume_job")
        assert {k.to_user_string() for k in resume.asset_layer.executable_asset_keys} == {"kit_gamma_notify"}
        assert resume.execute_in_process(instance=instance, partition_key=day, run_config=QUIET).success
        assert status_counts(db, "kit_gamma")["states"].get("resolved") == 2
    finally:
        flows.unregister("kit_gamma")


def _spec(tmp_path, stages, **kw):
    folder = tmp_path / "v"
    folder.mkdir(exist_ok=True)
    return FlowSpec(name="kit_bad", folder=folder, title="bad", config=FlowConfig(folder),
                    intake=IntakeSpec(to_item=_to_item), stages=stages, **kw)


@pytest.mark.parametrize("stages, ops, message", [
    ([Stage("a", loads="received", sets="stuck", fn=_score)], (), "sets 'stuck', which no stage loads"),
    ([Stage("a", loads="nowhere", sets="resolved", fn=_score)], (), "loads .*which no earlier stage sets"),
    ([Stage("a", loads="received", sets="resolved", fn=_score, after="b")], (), "is after 'b'"),
    ([Stage("kpi_report", loads="received", sets="resolved", fn=_score)], (), "names the kit uses"),
    ([Stage("a", loads="received", sets="x", branches=("w1", "w2"), fn=_score),
      Stage("b", loads="x", sets="resolved", fn=_score)], (), "one approval gate per flow"),
    ([Stage("a", loads="received", sets="resolved", branches=("w",), fn=_score)], (), "needs a stage after it"),
    ([Stage("a", loads="received", sets="resolved", fn=_score)], "typo", "after unknown stage"),
])
def test_spec_refuses_what_the_kit_would_build_wrongly(tmp_path, stages, ops, message):
    from orch_project.lib.flows import OpsStage

    extra = {"ops": [OpsStage("o", fn=_score, after=(ops,))]} if ops else {}
    with pytest.raises(ValueError, match=message):
        _spec(tmp_path, stages, **extra)


def test_model_task_names_are_unique_across_flows(tmp_path):
    import orch_project.defs.support.flow  # noqa: F401  (registers the support flow and its tasks)
    from orch_project.lib.flows import ModelTask

    with pytest.raises(ValueError, match=r"model task\(s\) \['triage'\] already belong to flow 'support'"):
        _spec(tmp_path, [Stage("a", loads="received", sets="resolved", fn=_score)],
              model_tasks={"triage": ModelTask(output=dict)})


def test_duplicates_are_found_by_the_flow_s_item_id(orch_home, db, tmp_path):
    """A flow whose item id is not the raw record's ``id``: a resubmission under another source key is a
    duplicate, not an item lost at insert."""
    from orch_project.lib import flows
    from orch_project.lib.intake import run_intake, submit_to_table
    from orch_project.lib.pipeline import StageEnv

    def by_ref(raw, ctx):
        return Accepted(item_id=f"ref-{raw['ref']}", data={"text": raw["text"]})

    folder = tmp_path / "delta"
    folder.mkdir()
    spec = FlowSpec(name="kit_delta", folder=folder, title="delta", config=FlowConfig(folder),
                    intake=IntakeSpec(to_item=by_ref), stages=[Stage("a", loads="received", sets="resolved", fn=_score)])
    try:
        day = utcnow().date().isoformat()
        submit_to_table(db, "kit_delta", [{"ref": 7, "text": "first"}], "test")
        run_intake(StageEnv(db, "kit_delta", [day], spec=spec), spec, None, "salt")
        submit_to_table(db, "kit_delta", [{"ref": 7, "text": "again"}, {"ref": 8, "text": "new"}], "test")
        run_intake(StageEnv(db, "kit_delta", [day], spec=spec), spec, None, "salt")
        st = status_counts(db, "kit_delta")
        assert (st["received"], st["lost"], st["states"]["duplicate"], st["states"]["received"]) == (3, 0, 1, 2)
    finally:
        flows.unregister("kit_delta")


def test_a_model_stage_after_the_gate_picks_up_its_deferred_items(orch_home, db, tmp_path):
    """An approved item the model stage after the gate deferred is still after the person's decision."""
    from orch_project.lib import flows
    from orch_project.lib.flows import RESUMED_STAGE
    from orch_project.lib.pipeline import StageEnv
    from orch_project.lib.store import items

    folder = tmp_path / "eps"
    folder.mkdir()
    spec = FlowSpec(name="kit_eps", folder=folder, title="eps", config=FlowConfig(folder),
                    intake=IntakeSpec(to_item=_to_item),
                    stages=[Stage("gate", loads="received", sets="ok", branches=("waiting",), fn=_score),
                            Stage("m", loads="ok", sets="resolved", fn=_score, kind="model")])
    try:
        now = utcnow()
        day = now.date().isoformat()
        base = {"flow": "kit_eps", "trace_id": "t", "day": day, "ingested_at": now, "updated_at": now,
                "escalation_level": 0, "data": {"text": "x"}}
        with db.begin() as conn:
            conn.execute(items.insert(), [{**base, "item_id": "by-person", "status": "deferred", "stage": RESUMED_STAGE},
                                          {**base, "item_id": "by-gate", "status": "deferred", "stage": "gate"},
                                          {**base, "item_id": "elsewhere", "status": "deferred", "stage": "intake"}])
        got = load_stage_items(StageEnv(db, "kit_eps", [day], spec=spec), "m")
        assert sorted(r["item_id"] for r in got) == ["by-gate", "by-person"]
    finally:
        flows.unregister("kit_eps")


def test_a_file_of_many_records_is_read_per_record_across_days(orch_home, db, tmp_path):
    """A CSV-like file parses into one source per record (``file:<name>#row=<n>``): records of two days are
    ingested by each day's run, none lost; a later run reads the file again and adds nothing."""
    from datetime import datetime, timedelta, timezone

    from orch_project.lib import flows
    from orch_project.lib.intake import Parsed, run_intake
    from orch_project.lib.pipeline import StageEnv

    today = utcnow().date()
    days = [(today - timedelta(days=1)).isoformat(), today.isoformat()]
    reads = []

    def rows(path: Path):
        reads.append(path.name)
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            day, text = line.split(",", 1)
            at = datetime.fromisoformat(day).replace(hour=9, tzinfo=timezone.utc)
            out.append(Parsed(f"file:{path.name}#row={n}", at, raw={"id": f"r{n}", "text": text,
                                                                     "received_at": at.isoformat()}))
        return out

    folder = tmp_path / "zeta"
    folder.mkdir()
    spec = FlowSpec(name="kit_zeta", folder=folder, title="zeta", config=FlowConfig(folder),
                    intake=IntakeSpec(to_item=_to_item, suffixes=(".csv",), parse_file=rows),
                    stages=[Stage("a", loads="received", sets="resolved", fn=_score)])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "import.csv").write_text(f"{days[0]},one\n{days[1]},two\n{days[1]},three\n")
    try:
        run_intake(StageEnv(db, "kit_zeta", [days[0]], spec=spec), spec, inbox, "salt")
        run_intake(StageEnv(db, "kit_zeta", [days[1]], spec=spec), spec, inbox, "salt")
        st = status_counts(db, "kit_zeta")
        assert (st["received"], st["lost"], st["states"]["received"]) == (3, 0, 3)
        n = len(reads)
        run_intake(StageEnv(db, "kit_zeta", days, spec=spec), spec, inbox, "salt")
        assert status_counts(db, "kit_zeta")["received"] == 3 and len(reads) == n + 1  # read, nothing new
    finally:
        flows.unregister("kit_zeta")
