"""The marketing program through Dagster: listening (filters, sentiment, topics, masking), complaints handed to
support exactly once, nothing unapproved ever published, publishing exactly once on re-runs, the calendar's
quiet hours and rate limits, brand checks, guardrails that cap a large budget shift, segments to leads."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from orch_project.defs.marketing import logic, program
from orch_project.lib import approvals as hitl
from orch_project.lib.intake import IntakeContext
from orch_project.lib.pipeline import StageEnv
from orch_project.lib.store import dlq, inbox, items

from .conftest import flow_inbox, run_flow, run_ops

FLOW = "marketing"
DAY = "2026-11-30"


@pytest.fixture(scope="session")
def sentiment_models(tmp_path_factory):
    """The sentiment model trained once per session (the labelled tweets when the data directory has them, else
    the lexicon fallback serves), shared by the tests through ORCH_MODELS_DIR."""
    from orch_project.lib import datasets

    folder = tmp_path_factory.mktemp("models")
    try:
        logic.sentiment_model(folder / "sentiment")
    except datasets.DatasetMissing:
        pass
    return folder


@pytest.fixture
def home(orch_home, sentiment_models, monkeypatch):
    monkeypatch.setenv("ORCH_MODELS_DIR", str(sentiment_models))
    return orch_home


def post(i: int, text: str, *, at: str = f"{DAY}T10:00:00Z", author: str | None = None, **extra) -> dict:
    return {"id": f"t{i}", "platform": "x", "author": author or f"@user_{i}", "text": text, "created_at": at,
            "metrics": {"likes": 3, "author_followers": 200, "author_following": 150, "author_posts_24h": 2,
                        "author_account_age_days": 900}, **extra}


FEED = [
    post(1, "Paid with my @northwindbank card abroad, contactless just works. Love it"),
    post(2, "@northwindbank my card was declined twice at the shop, unacceptable. Call me on 07700 900123"),
    post(3, "Is the @northwindbank app down? It is not loading since this morning"),
    post(4, "Crypto giveaway!!! DM me for 100x returns http://a.example/1 http://b.example/2 http://c.example/3"),
    post(5, "Big thanks @northwindbank follow back pls", author="@promo12345678",
         metrics={"author_followers": 2, "author_following": 3000, "author_posts_24h": 400, "author_account_age_days": 1}),
    post(6, "Je suis très déçu du service client de Northwind Bank, aucune réponse"),
    post(7, "Told @sarah_k about the Northwind savings pots, she switched today"),
    post(8, "Eastgate Bank app is down again, typical"),
]


def drop_feed(settings, name: str, posts: list[dict]) -> None:
    folder = flow_inbox(settings, FLOW)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(p) + "\n" for p in posts), encoding="utf-8")


def state(db) -> dict[str, dict]:
    with db.begin() as conn:
        return {d["post_id"] if d.get("kind") == "post" else iid: {"status": st, **d} for iid, st, d in conn.execute(
            sa.select(items.c.item_id, items.c.status, items.c.data).where(items.c.flow == FLOW))}


def support_rows(db) -> list[dict]:
    with db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(inbox.c.external_id, inbox.c.submitted_by).where(
            inbox.c.flow == "support")).mappings()]


def test_listening_filters_scores_topics_masks_and_hands_complaints_to_support_once(home, db, defs, instance):
    drop_feed(home, "feed-1.jsonl", FEED + [{"id": "bad", "platform": "x", "text": "no author", "created_at": f"{DAY}T11:00:00Z"}])
    assert run_flow(defs, instance, DAY, FLOW).success
    s = state(db)
    assert {k: s[f"t{k}"]["status"] for k in range(1, 9)} == {k: "resolved" for k in range(1, 9)}
    assert s["t4"]["filtered"]["kind"] == "spam" and s["t5"]["filtered"]["kind"] == "bot"
    assert s["t6"]["filtered"]["kind"] == "language" and "fr" in s["t6"]["filtered"]["reasons"][0]
    for k in (1, 2, 3, 7, 8):
        assert s[f"t{k}"]["sentiment"]["label"] in ("negative", "neutral", "positive"), s[f"t{k}"]
        assert 0 <= s[f"t{k}"]["sentiment"]["score"] <= 1
    assert s["t1"]["topic"]["id"] == "cards" and s["t7"]["topic"]["id"] == "savings"
    assert s["t3"]["urgency"]["kind"] == "outage"
    # personal data never stored: the phone number, another person's handle, the author's handle
    blob = json.dumps(s)
    assert "07700" not in blob and "@sarah_k" not in blob and "@user_2" not in blob
    assert "@northwindbank" in s["t1"]["text"]  # the brand's own handle stays
    # a competitor's outage is not ours to hand over
    assert s["t8"]["urgency"] is None and s["t8"]["brands"] == ["Eastgate Bank"]
    # the broken line is dead-lettered with its line number; the rest went on
    with db.begin() as conn:
        reasons = list(conn.execute(sa.select(dlq.c.reason).where(dlq.c.flow == FLOW)).scalars())
    assert len(reasons) == 1 and reasons[0].startswith("line 9:") and "author" in reasons[0]
    handed = {k for k in ("t2", "t3") if s[k].get("handed_to")}
    assert "t3" in handed
    rows = support_rows(db)
    assert len(rows) == len(handed) and all(r["submitted_by"] == "flow:marketing" for r in rows)
    # the support flow's own contract takes the hand-over: a social message from the author's handle, masked text
    from orch_project.defs.support import logic as support

    with db.begin() as conn:
        payload = json.loads(conn.execute(sa.select(inbox.c.payload).where(
            inbox.c.external_id == rows[0]["external_id"])).scalar_one())
    got = support.to_item(payload, IntakeContext("support", "salt", datetime.now(timezone.utc)))
    assert got.channel == "social" and "07700" not in got.data["body"]
    # re-running the partition and the hand-off itself hands nothing over twice
    assert run_flow(defs, instance, DAY, FLOW).success
    with db.begin() as conn:
        conn.execute(items.update().where(items.c.flow == FLOW, items.c.item_id.in_(
            [iid for iid, d in conn.execute(sa.select(items.c.item_id, items.c.data).where(items.c.flow == FLOW))
             if d.get("handed_to")])).values(status="topical", stage="topics"))
    logic.handoff_stage(StageEnv(db, FLOW, [DAY]), logic.CFG)
    assert len(support_rows(db)) == len(rows)


def _asset_waiting(home, db, defs, instance, channel: str = "social") -> str:
    brief = {"objective": "Grow interest in savings", "audience": "Savers", "message": "Savings pots made simple",
             "channels": [channel], "focus_topic": "savings", "week": "2026-W48", "evidence": []}
    from orch_project.lib.intake import hand_over

    hand_over(db, FLOW, FLOW, [{"kind": "asset_request", "id": f"brief:2026-W48:{channel}", "week": "2026-W48",
                                "channel": channel, "brief": brief}])
    today = datetime.now(timezone.utc).date().isoformat()
    assert run_flow(defs, instance, today, FLOW).success
    iid = f"asset-brief-2026-W48-{channel}"
    d = state(db)[iid]
    assert d["status"] == "awaiting_review", d
    assert d["variants"] and all(not program.violations(v, channel, logic.CFG.settings) for v in d["variants"])
    return iid


def publications(home) -> list[dict]:
    from orch_project.defs.resources import _embedded

    return _embedded(home.connectors_url).read("marketing_channels", "publications")


def test_nothing_unapproved_is_published_and_a_rerun_publishes_nothing_twice(home, db, defs, instance):
    from orch_project.defs.resources import _embedded

    iid = _asset_waiting(home, db, defs, instance)
    client = _embedded(home.connectors_url)
    env = StageEnv(db, FLOW, [])
    # an asset that reached publishing without a person's approval (a bug, a hand edit) is never published
    with db.begin() as conn:
        data = conn.execute(sa.select(items.c.data).where(items.c.item_id == iid)).scalar_one()
        conn.execute(items.update().where(items.c.item_id == iid).values(
            status="scheduled", stage="schedule", data={**data, "slot": "2026-01-01T09:00:00+00:00"}))
    rep = program.publish_stage(env, logic.CFG, client)
    assert rep.metadata["refused_unapproved"] == 1 and publications(home) == []
    assert state(db)[iid]["status"] == "dead_lettered"
    # the same asset approved by the marketing manager (after a replay) goes out once per kept variant, on its slot
    with db.begin() as conn:
        conn.execute(items.update().where(items.c.item_id == iid).values(status="awaiting_review", stage="review_gate"))
    with pytest.raises(hitl.ApprovalError):  # an analyst may not approve
        hitl.decide(db, iid, "approve", "mk-ines", "looks fine", None, logic.CFG.roster, flow=FLOW)
    hitl.decide(db, iid, "approve", "mm-maya", "on brief", "keep: [B]\n", logic.CFG.roster, flow=FLOW)
    hitl.resume_decided(db, FLOW)
    program.schedule_stage(env, logic.CFG, now=datetime(2026, 12, 7, 22, 30, tzinfo=timezone.utc))
    d = state(db)[iid]
    assert d["status"] == "scheduled" and d["slot"].startswith("2026-12-08T08:00")  # after the quiet hours
    early = program.publish_stage(env, logic.CFG, client, now=datetime(2026, 12, 8, 7, 0, tzinfo=timezone.utc))
    assert early.metadata["not_due_yet"] == 1 and publications(home) == []
    on_time = datetime(2026, 12, 8, 8, 0, tzinfo=timezone.utc)
    program.publish_stage(env, logic.CFG, client, now=on_time)
    pubs = publications(home)
    assert [(p["item_id"], p["variant"]) for p in pubs] == [(iid, "B")] and state(db)[iid]["status"] == "resolved"
    # re-runs: the stage, the ops job, the partition -- nothing is published twice
    with db.begin() as conn:
        conn.execute(items.update().where(items.c.item_id == iid).values(status="scheduled", stage="schedule"))
    program.publish_stage(env, logic.CFG, client, now=on_time)
    assert run_ops(defs, instance, FLOW).success
    assert run_flow(defs, instance, datetime.now(timezone.utc).date().isoformat(), FLOW).success
    assert len(publications(home)) == 1
    assert client.duplicates(FLOW).get("marketing_channels", 0) == 0


def test_calendar_keeps_quiet_hours_rate_limits_and_gaps():
    s = logic.CFG.settings
    night = datetime(2026, 12, 7, 23, 10, tzinfo=timezone.utc)
    assert program.quiet(night, s)
    first = program.next_slot("email", [], night, s)
    assert first == datetime(2026, 12, 8, 8, 0, tzinfo=timezone.utc)
    second = program.next_slot("email", [first], night, s)  # e-mail: one a day, 24 h apart
    assert second == datetime(2026, 12, 9, 8, 0, tzinfo=timezone.utc)
    taken: list[datetime] = []
    for _ in range(4):
        taken.append(program.next_slot("social", taken, night, s))
    assert [t.hour for t in taken] == [8, 11, 14, 8] and taken[3].date() > taken[0].date()  # three a day, 3 h apart


def test_brand_check_refuses_claims_lengths_missing_disclaimers_and_personal_data():
    s = logic.CFG.settings
    ok = {"id": "A", "headline": "Savings made simple", "description": "Open a pot in minutes. T&Cs apply."}
    assert program.violations(ok, "search_ads", s) == []
    bad = {"id": "B", "headline": "Guaranteed returns, the best bank in town",
           "description": "Mail jo.bloggs@example.com for risk-free savings"}
    found = " | ".join(program.violations(bad, "search_ads", s))
    for part in ("headline is", "lacks the required 'T&Cs apply.'", "'guaranteed'", "'risk-free'", "'best bank'",
                 "personal data"):
        assert part in found, found


def _allocation_world(client, *, strong: bool) -> None:
    """Two weeks of reporting where search ads convert far better than social (strong) or about the same."""
    from orch_project.lib.connectors.embedded import Effect

    rows = []
    for i in range(14):
        day = (datetime(2026, 11, 16) + timedelta(days=i)).date().isoformat()
        for ch, conv in (("email", 20), ("social", 5 if strong else 19), ("search_ads", 60 if strong else 21)):
            rows.append({"date": day, "channel": ch, "asset": f"h-{ch}", "variant": "A", "topic": "cards",
                         "impressions": 10000, "clicks": 400, "conversions": conv, "spend": 333.33, "revenue": conv * 60.0})
    with client.db.begin() as conn:
        logic.ensure_tables(conn)
        client.db.insert_ignore(conn, logic.channel_metrics, rows, ["date", "channel", "asset", "variant"])
    client.deliver("marketing_channels", [Effect(f"hist:{c}", "marketing_channels", "set_budget", "hist", "",
                                                 {"period": "2026-W48", "channel": c, "amount": 7000 / 3})
                                          for c in ("email", "social", "search_ads")])


@pytest.mark.parametrize("strong", [True, False])
def test_guardrails_cap_a_large_shift_and_a_large_shift_waits_for_a_person(home, db, defs, instance, strong):
    from orch_project.defs.resources import _embedded

    client = _embedded(home.connectors_url)
    _allocation_world(client, strong=strong)
    s = logic.CFG.settings
    now = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
    rep = program.reallocate_stage(StageEnv(db, FLOW, []), logic.CFG, client, now=now)
    assert rep.metadata["proposed"] == 1
    again = program.reallocate_stage(StageEnv(db, FLOW, []), logic.CFG, client, now=now)
    assert "proposed already" in again.metadata["allocation"]
    alloc = rep.metadata["allocation"]
    assert abs(sum(alloc.values()) - s.weekly_budget) < 0.05
    for c, amount in alloc.items():  # the guardrails: no channel moves by more than max_shift, none below min_share
        assert abs(amount - 7000 / 3) <= s.max_shift * s.weekly_budget + 0.01, (c, amount)
        assert amount >= s.min_share * s.weekly_budget - 0.01
    if strong:  # the evidence pushes search ads to the cap and social down to it
        assert alloc["search_ads"] == pytest.approx(7000 / 3 + s.max_shift * 7000, abs=1.0)
    today = datetime.now(timezone.utc).date().isoformat()
    assert run_flow(defs, instance, today, FLOW).success
    d = state(db)["alloc-2026-W50"]
    if strong:  # a shift above approval_shift waits for the marketing manager; nothing is set until then
        assert d["status"] == "awaiting_review" and d["max_shift"] > s.approval_shift
        assert client.read("marketing_channels", "budgets").get("2026-W50") is None
    else:
        assert d["status"] == "resolved" and d["auto_approved"]
        assert set(client.read("marketing_channels", "budgets")["2026-W50"]) == {"email", "social", "search_ads"}


def test_segments_are_handed_to_leads_nurture_once(home, db):
    from orch_project.defs.leads import logic as leads
    from orch_project.defs.resources import _embedded
    from orch_project.lib.connectors.embedded import import_contacts

    client = _embedded(home.connectors_url)
    import_contacts(client.db, [
        {"contact_id": "c-1", "name": "Ada Quist", "email": "ada@quistlabs.com", "company": "Quist Labs", "stage": "Lead"},
        {"contact_id": "c-2", "name": "Bo Varga", "email": "bo@varga.example", "company": "Varga", "stage": "Lead",
         "unsubscribed": True},
        {"contact_id": "c-3", "name": "Cy Ruiz", "email": "cy@ruiz.example", "company": "Ruiz", "stage": "Lead"}])
    now = datetime.now(timezone.utc)
    with client.db.begin() as conn:
        logic.ensure_tables(conn)
        client.db.insert_ignore(conn, logic.channel_engagements, [
            {"contact_id": "c-1", "asset": "a1", "topic": "savings", "clicked": True, "converted": False, "at": now},
            {"contact_id": "c-2", "asset": "a1", "topic": "savings", "clicked": True, "converted": False, "at": now},
            {"contact_id": "c-3", "asset": "a1", "topic": "savings", "clicked": True, "converted": True, "at": now}],
            ["contact_id", "asset"])
    env = StageEnv(db, FLOW, [])
    rep = program.segments_stage(env, logic.CFG, client)
    assert rep.metadata["handed_to_nurture"] == 1 and rep.metadata["skipped_no_consent"] == 1
    assert program.segments_stage(env, logic.CFG, client).metadata["new_handovers"] == 0
    with db.begin() as conn:
        rows = conn.execute(sa.select(inbox.c.payload).where(inbox.c.flow == "leads")).scalars().all()
    assert len(rows) == 1
    got = leads.to_item(json.loads(rows[0]), IntakeContext("leads", "salt", now))
    assert got.data["source"] == "marketing_segment" and got.data["attributes"]["Topic"] == "savings"
    assert "ada@quistlabs.com" not in json.dumps(got.data)


def test_a_feed_file_is_read_per_line(home):
    parsed = logic.parse_file(_write(home, "f.jsonl", "\n".join([json.dumps(FEED[0]), "{oops", "[1]"])))
    assert [p.error_type for p in parsed] == [None, "malformed", "malformed"]
    assert parsed[0].source_key == "file:f.jsonl#row=1" and parsed[0].received_at.date().isoformat() == DAY


def _write(home, name: str, text: str):
    p = home.home / name
    p.write_text(text, encoding="utf-8")
    return p


def test_idea_brief_is_a_weekly_partition_briefed_once_and_only_when_the_week_is_over(home, db, defs, instance):
    """marketing_weekly_job partition = one ISO week (Monday): the week's listened posts become one brief and one
    asset request per channel, once however often the partition runs; a week with no posts briefs nothing."""
    import dagster as dg

    from .conftest import QUIET

    drop_feed(home, "week.jsonl", FEED)
    assert run_flow(defs, instance, DAY, FLOW).success
    job = defs.resolve_job_def("marketing_weekly_job")
    assert isinstance(job.partitions_def, dg.WeeklyPartitionsDefinition)
    monday = "2026-11-30"  # DAY's ISO week, 2026-W49
    assert monday in job.partitions_def.get_partition_keys()

    def briefs() -> list[str]:
        with db.begin() as conn:
            return sorted(conn.execute(sa.select(inbox.c.external_id).where(
                inbox.c.flow == FLOW, inbox.c.external_id.like("brief:%"))).scalars())

    for _ in range(2):  # the second run of the partition adds nothing
        assert job.execute_in_process(instance=instance, partition_key=monday, run_config=QUIET).success
        assert briefs() and all(b.startswith("brief:2026-W49:") for b in briefs())
    n = len(briefs())
    assert job.execute_in_process(instance=instance, partition_key="2026-11-23", run_config=QUIET).success
    assert len(briefs()) == n  # no listened posts that week: nothing to brief
    mat = instance.get_latest_materialization_event(dg.AssetKey("marketing_idea_brief"))
    assert mat is not None
