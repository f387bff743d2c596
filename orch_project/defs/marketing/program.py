"""The marketing program's acting half, as plain functions: the weekly idea brief (ops), copy variants per
channel, brand and policy checks, the reviewer's gate, the content calendar, publishing through the outbox
exactly once, and the ops stages that learn from what was published (performance with intervals, budget
re-allocation by Thompson sampling with guardrails, nurture segments handed to the leads flow).

Nothing unapproved is ever published: ``publish_stage`` asks the approvals table itself before it plans a
publication (an asset needs a person's approval; an allocation a person's, or the gate's own within the
brief's threshold) and dead-letters anything else with the reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import string
from collections import Counter, defaultdict
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from ...lib.approvals import yaml_edit
from ...lib.connectors.embedded import Effect
from ...lib.contracts import EMAIL_RE, LLMOutput, LLMStepRequest
from ...lib.guardrails import pii
from ...lib.intake import hand_over, vault_lookup
from ...lib.outbox import dispatch
from ...lib.pipeline import (ItemUpdate, StageEnv, StageReport, commit_stage, load_items, load_stage_items,
                             model_step_failed, without_deferred)
from ...lib.saga import run_effects_stage, step_key
from ...lib.store import approvals, inbox, items, utcnow
from .logic import (BRIEF_TASK, CFG, COPY_TASK, FLOW, MarketingConfig, MarketingSettings, iso_week, week_days)

VARIANTS = ("A", "B", "C")
FIELDS = {"email": ("subject", "body"), "social": ("text",), "ad": ("headline", "description")}


# --- the idea brief (weekly) ---------------------------------------------------------------------------------

class BriefOutput(LLMOutput):
    objective: str = Field(min_length=3, max_length=300)
    audience: str = Field(min_length=3, max_length=300)
    message: str = Field(min_length=3, max_length=400)
    channels: list[str] = Field(min_length=1, max_length=8)
    focus_topic: str = Field(min_length=1, max_length=64)


def _post_weeks(env: StageEnv) -> dict[str, list[str]]:
    """ISO week -> its partition days that hold listened posts (resolved after the hand-off: kept, scored and
    given a topic), from the day column alone."""
    with env.db.begin() as conn:
        days = conn.execute(sa.select(items.c.day).where(
            items.c.flow == env.flow, items.c.status == "resolved", items.c.stage == "handoff").distinct()).scalars()
        out: dict[str, list[str]] = defaultdict(list)
        for day in days:
            out[iso_week(date.fromisoformat(str(day)))].append(str(day))
    return out


def _week_posts(env: StageEnv, week: str) -> list[dict[str, Any]]:
    days = [d.isoformat() for d in week_days(week)]
    return [r for r in load_items(StageEnv(env.db, env.flow, days, run_id=env.run_id, spec=env.spec), "resolved",
                                  stage="handoff") if r["data"].get("topic")]


def _lean(rows: list[dict[str, Any]]) -> float:
    """Net sentiment in [-1, 1]: positive share minus negative share."""
    labels = Counter(r["data"]["sentiment"]["label"] for r in rows)
    return (labels["positive"] - labels["negative"]) / len(rows) if rows else 0.0


def evidence(week_posts: list[dict[str, Any]], prev_posts: list[dict[str, Any]], s: MarketingSettings
             ) -> list[dict[str, Any]]:
    """Per topic of the week: mentions, the previous week's, growth, net sentiment and its shift, the share of
    negative posts, and two masked quotes (the most engaged posts); top topics first, then rising ones."""
    names = {t.id: t.name for t in s.themes}
    by, prev = defaultdict(list), defaultdict(list)
    for r in week_posts:
        by[r["data"]["topic"]["id"]].append(r)
    for r in prev_posts:
        prev[r["data"]["topic"]["id"]].append(r)
    out = []
    for tid, rows in by.items():
        if tid == "other":
            continue
        p = prev.get(tid, [])
        quotes = sorted(rows, key=lambda r: -((r["data"].get("metrics") or {}).get("likes", 0)
                                              + 2 * (r["data"].get("metrics") or {}).get("reposts", 0)))[:2]
        out.append({"topic": tid, "name": names.get(tid, rows[0]["data"]["topic"].get("evidence") or tid),
                    "mentions": len(rows), "previous": len(p), "growth": round((len(rows) + 1) / (len(p) + 1), 2),
                    "net_sentiment": round(_lean(rows), 3), "sentiment_shift": round(_lean(rows) - _lean(p), 3) if p else None,
                    "negative_share": round(sum(r["data"]["sentiment"]["label"] == "negative" for r in rows) / len(rows), 3),
                    "quotes": [q["data"]["text"][:240] for q in quotes]})
    top = sorted(out, key=lambda e: (-e["mentions"], e["topic"]))[:s.top_topics]
    rising = sorted((e for e in out if e not in top and e["mentions"] >= 3), key=lambda e: (-e["growth"], e["topic"]))
    for e in top:
        e["why"] = "top"
    for e in rising[:2]:
        e["why"] = "rising"
    return top + rising[:2]


def week_briefed(db, week: str) -> bool:
    with db.begin() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(inbox).where(
            inbox.c.flow == FLOW, inbox.c.external_id.like(f"brief:{week}:%"))).scalar_one() > 0


class BriefTask:
    """The embedded provider's brief writer: picks the focus from the evidence (the most mentioned topic people
    feel good about, else the most mentioned one, reassured) and writes the brief with templates."""

    model = "marketing-brief-template"

    def run(self, requests, prompt_vars) -> list:
        from ...lib.llm.gateway import ProviderResult, estimate_tokens

        out = []
        for r in requests:
            ctx = r.inputs.context
            ev = ctx["evidence"]
            if not ev:
                out.append(ProviderResult(None, error="schema_mismatch", reason="no topic evidence to brief from"))
                continue
            happy = [e for e in ev if e["net_sentiment"] > 0]
            focus = (happy or ev)[0]
            worried = focus["net_sentiment"] < 0
            objective = (f"Reassure customers talking about {focus['name'].lower()} and show what we are doing about "
                         "it" if worried else f"Grow interest in {focus['name'].lower()}, which people are "
                         f"{'increasingly ' if (focus.get('sentiment_shift') or 0) > 0 else ''}positive about")
            message = (f"{ctx['brand']} is listening: here is how {focus['name'].lower()} works for you and where to get "
                       "help fast" if worried else f"{focus['name']} from {ctx['brand']}: simple, clear and built around you")
            audience = ("Current customers who mentioned " + focus["name"].lower() + f" ({focus['mentions']} posts "
                        "this week) and people like them")
            output = {"objective": objective, "audience": audience, "message": message,
                      "channels": list(ctx["channels"]), "focus_topic": focus["topic"]}
            out.append(ProviderResult(output, estimate_tokens(json.dumps(ctx)), estimate_tokens(json.dumps(output)), 1.0))
        return out


def brief_local_task(db):
    return BriefTask()


def idea_brief_stage(env: StageEnv, cfg: MarketingConfig, gateway, *, now: datetime | None = None) -> StageReport:
    """The brief of one ISO week (the week partition's: ``env.days``; without days, the latest complete week with
    listened posts), once per week: top and rising topics with their evidence (mentions, growth, sentiment shift,
    masked quotes) turned into a brief (objective, audience, message, channels) through the gateway (task
    ``marketing_brief``), then one asset request per channel into the program's own intake."""
    started = utcnow()
    now = now or started
    s = cfg.settings
    weeks = _post_weeks(env.across_partitions())
    done = [w for w in sorted(weeks) if week_days(w)[-1] < now.date()]
    md: dict[str, Any] = {"weeks_with_posts": len(weeks)}
    if env.days:
        asked = iso_week(date.fromisoformat(env.days[0]))
        md["week"] = asked
        if week_days(asked)[-1] >= now.date():
            md["brief"] = f"{asked} is not over yet"
            return StageReport("idea_brief", 0, Counter(), (utcnow() - started).total_seconds() * 1000.0, md)
        if asked not in weeks:
            md["brief"] = f"no listened posts in {asked}: nothing to brief"
            return StageReport("idea_brief", 0, Counter(), (utcnow() - started).total_seconds() * 1000.0, md)
        done = [asked]
    if not done:
        md["brief"] = "no complete week of listened posts yet"
        return StageReport("idea_brief", 0, Counter(), (utcnow() - started).total_seconds() * 1000.0, md)
    week = done[-1]
    if week_briefed(env.db, week):
        md["brief"] = f"{week} briefed already"
        return StageReport("idea_brief", 0, Counter(), (utcnow() - started).total_seconds() * 1000.0, md)
    prev = iso_week(week_days(week)[0] - timedelta(days=7))
    ev = evidence(_week_posts(env, week), _week_posts(env, prev) if prev in weeks else [], s)
    req = LLMStepRequest(id=f"brief-{week}", inputs={"text": json.dumps(ev)[:6000], "context": {
        "brand": s.brand, "week": week, "evidence": ev, "channels": list(s.channels)}})
    (resp,), stats = gateway.run(BRIEF_TASK, [req], BriefOutput)
    md.update(stats.as_metadata("idea_brief") if stats else {})
    if not resp.ok:
        md["brief"] = f"{week}: the brief could not be written ({resp.error}: {resp.reason}); the next run tries again"
        return StageReport("idea_brief", 1, Counter({"deferred": 1}), (utcnow() - started).total_seconds() * 1000.0, md)
    brief = {**resp.output.model_dump(exclude={"citations"}, exclude_none=True), "week": week, "evidence": ev}
    channels = [c for c in brief["channels"] if c in s.channels] or list(s.channels)
    records = [{"kind": "asset_request", "id": f"brief:{week}:{c}", "week": week, "channel": c, "brief": brief}
               for c in channels]
    added = hand_over(env.db, FLOW, FLOW, records)
    md.update({"week": week, "asset_requests": added, "brief_md": _brief_md(brief)})
    return StageReport("idea_brief", 1, Counter({"ok": 1}), (utcnow() - started).total_seconds() * 1000.0, md)


def _brief_md(b: dict[str, Any]) -> str:
    lines = [f"**Week {b['week']}** -- focus `{b['focus_topic']}`", "", f"- objective: {b['objective']}",
             f"- audience: {b['audience']}", f"- message: {b['message']}", f"- channels: {', '.join(b['channels'])}",
             "", "| topic | why | mentions | previous | net sentiment | shift |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['topic']} | {e.get('why', '')} | {e['mentions']} | {e['previous']} | {e['net_sentiment']:+.2f} | "
              f"{'' if e['sentiment_shift'] is None else format(e['sentiment_shift'], '+.2f')} |" for e in b["evidence"]]
    return "\n".join(lines)


# --- copy: variants per channel --------------------------------------------------------------------------------

class CopyVariant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-C]$")
    subject: str | None = Field(None, max_length=300)
    body: str | None = Field(None, max_length=4000)
    text: str | None = Field(None, max_length=2000)
    headline: str | None = Field(None, max_length=200)
    description: str | None = Field(None, max_length=500)


class CopyOutput(LLMOutput):
    variants: list[CopyVariant] = Field(min_length=1, max_length=3)


COPY_TEMPLATES: dict[str, list[dict[str, str]]] = {
    "email": [
        {"subject": "${focus_name}: what's new at ${brand}",
         "body": "Hello,\n\n${message}.\n\n${objective_sentence}\n\nSee the details in the app or at northwind.example/${focus}.\n\n${required}"},
        {"subject": "Your questions about ${focus_lower}, answered",
         "body": "Hello,\n\nYou asked, we listened. ${message}.\n\nOpen the app to see how it works for you.\n\n${required}"}],
    "social": [
        {"text": "${message}. More in the app. ${hashtag} ${required}"},
        {"text": "You asked about ${focus_lower}; here's the short answer: ${message_lower}. ${hashtag} ${required}"}],
    "ad": [
        {"headline": "${focus_name}, made simple", "description": "${message}. ${required}"},
        {"headline": "${focus_name} at ${brand}", "description": "Built around you. ${required}"}],
}


class CopyTask:
    """The embedded provider's copywriter: two variants (A/B) per channel from the brief, with templates."""

    model = "marketing-copy-template"

    def run(self, requests, prompt_vars) -> list:
        from ...lib.llm.gateway import ProviderResult, estimate_tokens

        out = []
        for r in requests:
            ctx = r.inputs.context
            values = {k: str(v) for k, v in ctx.items() if isinstance(v, (str, int, float))}
            try:
                variants = [{"id": VARIANTS[i], **{f: string.Template(t).substitute(values).strip() for f, t in tpl.items()}}
                            for i, tpl in enumerate(COPY_TEMPLATES[ctx["channel_kind"]])]
            except (KeyError, ValueError) as exc:
                out.append(ProviderResult(None, error="schema_mismatch", reason=f"copy template needs {exc}"))
                continue
            out.append(ProviderResult({"variants": variants}, estimate_tokens(r.inputs.text),
                                      estimate_tokens(json.dumps(variants)), 1.0))
        return out


def copy_local_task(db):
    return CopyTask()


def _copy_context(d: dict[str, Any], s: MarketingSettings) -> dict[str, Any]:
    b = d["brief"]
    rules = s.channels[d["channel"]]
    names = {t.id: t.name for t in s.themes}
    focus_name = names.get(b["focus_topic"], b["focus_topic"].removeprefix("kp-").replace("-", " ").title())
    message = b["message"].rstrip(".")
    return {"brand": s.brand, "channel": d["channel"], "channel_kind": rules.kind, "focus": b["focus_topic"],
            "focus_name": focus_name, "focus_lower": focus_name.lower(), "message": message,
            "message_lower": message[:1].lower() + message[1:], "objective_sentence": b["objective"].rstrip(".") + ".",
            "hashtag": "#" + re.sub(r"\W", "", focus_name.title()), "required": " ".join(rules.required),
            "limits": json.dumps(rules.max_chars), "banned_claims": ", ".join(s.banned_claims)}


def compose_stage(env: StageEnv, cfg: MarketingConfig, gateway) -> StageReport:
    """Copy variants (A/B) for each requested channel through the gateway (task ``marketing_copy``): e-mail
    subject and body, a social post, an ad headline and description."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "compose")
    reqs = [LLMStepRequest(id=r["item_id"], inputs={"text": r["data"]["brief"]["message"],
                                                     "context": _copy_context(r["data"], s)}) for r in rows]
    responses, stats = gateway.run(COPY_TASK, reqs, CopyOutput) if reqs else ([], None)
    updates = []
    for r, resp in zip(rows, responses):
        if not resp.ok:
            updates.append(model_step_failed(r, "compose", resp, label="copy"))
            continue
        d = without_deferred(r["data"])
        fields = FIELDS[d["channel_kind"]]
        d["variants"] = [{"id": v.id, **{f: getattr(v, f) or "" for f in fields}} for v in resp.output.variants]
        updates.append(ItemUpdate(r["item_id"], "composed", d))
    md = stats.as_metadata("compose") if stats else {}
    md["variants"] = sum(len(u.data.get("variants") or []) for u in updates)
    return commit_stage(env, "compose", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- brand and policy ------------------------------------------------------------------------------------------

def violations(variant: dict[str, Any], channel: str, s: MarketingSettings) -> list[str]:
    """The brand and policy rules one variant breaks: length per field, the channel's required sentences, the
    brief's banned claims, personal data."""
    rules = s.channels[channel]
    out = []
    fields = FIELDS[rules.kind]
    for f in fields:
        v = variant.get(f) or ""
        if not v.strip():
            out.append(f"{f} is empty")
        if f in rules.max_chars and len(v) > rules.max_chars[f]:
            out.append(f"{f} is {len(v)} characters (at most {rules.max_chars[f]} on {channel})")
    text = "\n".join(variant.get(f) or "" for f in fields)
    low = text.casefold()
    out += [f"lacks the required {req!r}" for req in rules.required if req.casefold() not in low]
    out += [f"makes the banned claim {c!r}" for c in s.banned_claims if re.search(r"\b" + re.escape(c.casefold()) + r"\b", low)]
    found = sorted({sp.entity_type for sp in pii.detect(text)})
    if found or re.search(r"<[A-Z_]+>", text):
        out.append("carries personal data (" + (", ".join(found) or "a masked placeholder") + ")")
    return out


def brand_check_stage(env: StageEnv, cfg: MarketingConfig) -> StageReport:
    """Every variant held to the brand and policy rules; a variant that breaks one is kept out with its reasons
    (the reviewer sees them). An asset with no clean variant is refused (terminal, audited)."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "brand_check")
    updates, audit_rows = [], []
    for r in rows:
        d = copy.deepcopy(r["data"])
        clean, refused = [], []
        for v in d["variants"]:
            bad = violations(v, d["channel"], s)
            (refused if bad else clean).append({**v, "violations": bad} if bad else v)
        d["variants"], d["refused_variants"] = clean, refused
        if clean:
            updates.append(ItemUpdate(r["item_id"], "checked", d))
            continue
        why = "; ".join(f"{v['id']}: {', '.join(v['violations'])}" for v in refused)
        updates.append(ItemUpdate(r["item_id"], "rejected", d, "routed", columns={"resolved_at": started}))
        audit_rows.append({"actor": "system:brand_check", "action": "refused", "flow": env.flow, "item_id": r["item_id"],
                           "trace_id": r["trace_id"], "reason": f"no variant passes the brand policy ({why})"[:1000]})
    md = {"variants_clean": sum(len(u.data["variants"]) for u in updates),
          "variants_refused": sum(len(u.data["refused_variants"]) for u in updates),
          "refusal_reasons": dict(Counter(x.split(" (")[0].split(" is ")[0] for u in updates
                                          for v in u.data["refused_variants"] for x in v["violations"]))}
    return commit_stage(env, "brand_check", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        audit_rows=audit_rows, metadata=md)


# --- the reviewer's gate ------------------------------------------------------------------------------------------

def max_shift(d: dict[str, Any]) -> float:
    """The largest move of one channel, as a share of the budget."""
    prev, new, budget = d.get("previous") or {}, d["allocation"], float(d["budget"])
    return max((abs(float(new[c]) - float(prev.get(c, 0.0))) / budget for c in new), default=0.0)


def review_gate_stage(env: StageEnv, cfg: MarketingConfig) -> StageReport:
    """Every asset waits for a reviewer (the marketing manager: roles and audit from the approvals queue); an
    allocation waits when it moves a channel by more than the brief's ``approval_shift`` of the budget, and
    goes on by policy otherwise (audited)."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "review_gate")
    pol = cfg.brief.approval
    sla = cfg.brief.sla_hours
    updates, approval_rows, audit_rows = [], [], []
    for r in rows:
        d = dict(r["data"])
        if d["kind"] == "allocation":
            shift = max_shift(d)
            d["max_shift"] = round(shift, 4)
            reason = "budget_shift" if shift > s.approval_shift else None
        else:
            reason = "asset_review"
        if reason:
            due = started + timedelta(hours=sla["medium"])
            updates.append(ItemUpdate(r["item_id"], "awaiting_review", d, "routed", columns={"due_at": due}))
            approval_rows.append({"flow": env.flow, "item_id": r["item_id"], "reason": reason,
                                  "required_role": pol.reviewer_role, "status": "pending", "due_at": due,
                                  "created_at": started, "edited": False})
        else:
            d["auto_approved"] = {"by": "system:review_gate", "at": started.isoformat(),
                                  "reason": f"largest shift {d['max_shift']:.1%} within {s.approval_shift:.0%}"}
            updates.append(ItemUpdate(r["item_id"], "approved", d))
        audit_rows.append({"actor": "system:review_gate", "action": "approval_requested" if reason else "auto_approved",
                           "flow": env.flow, "item_id": r["item_id"], "trace_id": r["trace_id"],
                           "reason": reason or d["auto_approved"]["reason"],
                           "inputs": {"kind": d["kind"], "channel": d.get("channel"), "max_shift": d.get("max_shift")}})
    md = {"awaiting_review": len(approval_rows), "auto_approved": len(rows) - len(approval_rows)}
    return commit_stage(env, "review_gate", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        approval_rows=approval_rows, audit_rows=audit_rows, metadata=md)


def apply_review(data: dict[str, Any], text: str, reviewer: str, at: str) -> tuple[dict[str, Any], Any]:
    """A reviewer's changes (``orch approve ID --edit-file F``, YAML). An asset: ``keep: [A]`` (the variants to
    publish) and ``A.body: TEXT`` (a field of a variant, masked and held to the brand policy). An allocation:
    ``allocation: {channel: amount}`` (must still sum to the budget and keep every channel's minimum share)."""
    edit = yaml_edit(text, ("keep: [A]", "A.text: ...", "allocation: {...}"))
    s = CFG.settings
    new = copy.deepcopy(data)
    replaced: dict[str, Any] = {}
    if data["kind"] == "allocation":
        if set(edit) != {"allocation"} or not isinstance(edit["allocation"], dict):
            raise ValueError("an allocation takes one key: `allocation: {channel: amount, ...}`")
        got = {str(k): float(v) for k, v in edit["allocation"].items()}
        if set(got) != set(data["allocation"]):
            raise ValueError(f"give an amount for exactly these channels: {', '.join(sorted(data['allocation']))}")
        if abs(sum(got.values()) - float(data["budget"])) > 0.05:
            raise ValueError(f"the amounts sum to {sum(got.values()):,.2f}, not the budget {float(data['budget']):,.2f}")
        if low := [c for c, v in got.items() if v < s.min_share * float(data["budget"]) - 0.005]:
            raise ValueError(f"{', '.join(low)} below the minimum share {s.min_share:.0%} of the budget")
        replaced["allocation"], new["allocation"] = data["allocation"], got
        new["max_shift"] = round(max_shift(new), 4)
    else:
        allowed = {"keep"} | {f"{v}.{f}" for v in VARIANTS for f in FIELDS[data["channel_kind"]]}
        if unknown := sorted(set(edit) - allowed):
            raise ValueError(f"unknown key(s) {unknown}; allowed: keep, and VARIANT.FIELD for fields "
                             f"{', '.join(FIELDS[data['channel_kind']])}")
        by_id = {v["id"]: v for v in new["variants"]}
        for key, value in edit.items():
            if key == "keep":
                continue
            vid, field = key.split(".")
            if vid not in by_id:
                raise ValueError(f"there is no clean variant {vid} (variants: {', '.join(by_id)})")
            replaced[key] = by_id[vid][field]
            by_id[vid][field] = pii.mask(str(value)).text
            if bad := violations(by_id[vid], data["channel"], s):
                raise ValueError(f"variant {vid} breaks the brand policy: " + "; ".join(bad))
        if "keep" in edit:
            keep = [str(x) for x in (edit["keep"] if isinstance(edit["keep"], list) else [edit["keep"]])]
            if not keep or any(k not in by_id for k in keep):
                raise ValueError(f"keep names the variants to publish, of {', '.join(by_id)}")
            replaced["keep"] = list(by_id)
            new["variants"] = [by_id[k] for k in keep]
    new["reviewed_by"], new["reviewed_at"] = reviewer, at
    return new, replaced


# --- the calendar ----------------------------------------------------------------------------------------------

def quiet(t: datetime, s: MarketingSettings) -> bool:
    h = t.astimezone(ZoneInfo(s.timezone)).hour
    lo, hi = s.quiet_hours
    return (lo <= h or h < hi) if lo > hi else (lo <= h < hi)


def next_slot(channel: str, taken: list[datetime], now: datetime, s: MarketingSettings) -> datetime:
    """The first hour from ``now`` outside quiet hours where the channel has room that local day (``per_day``)
    and is ``min_gap_hours`` from every slot already taken."""
    rules = s.channels[channel]
    tz = ZoneInfo(s.timezone)
    t = now.replace(minute=0, second=0, microsecond=0) + (timedelta(hours=1) if (now.minute or now.second) else timedelta())
    per_day = Counter(x.astimezone(tz).date() for x in taken)
    for _ in range(24 * 60):
        if not quiet(t, s) and per_day[t.astimezone(tz).date()] < rules.per_day and \
                all(abs((t - x).total_seconds()) >= rules.min_gap_hours * 3600 for x in taken):
            return t
        t += timedelta(hours=1)
    raise ValueError(f"no free slot on {channel} in 60 days: raise its per_day or lower min_gap_hours")


def calendar(env: StageEnv) -> dict[str, list[datetime]]:
    """Slots already taken per channel: assets scheduled, and assets published (resolved at publish), every
    partition."""
    out: dict[str, list[datetime]] = defaultdict(list)
    every = env.across_partitions()
    for r in [*load_items(every, "scheduled"), *load_items(every, "resolved", stage="publish")]:
        d = r["data"]
        if d.get("kind") == "asset_request" and d.get("slot"):
            out[d["channel"]].append(datetime.fromisoformat(d["slot"]))
    return out


def schedule_stage(env: StageEnv, cfg: MarketingConfig, *, now: datetime | None = None) -> StageReport:
    """An approved asset gets the channel's next free slot (rate limit per day, minimum gap, quiet hours); an
    approved allocation takes effect now. Both wait in ``scheduled`` for publish."""
    started = utcnow()
    now = now or started
    s = cfg.settings
    rows = load_stage_items(env, "schedule")
    taken = calendar(env) if rows else {}
    updates = []
    for r in rows:
        d = dict(r["data"])
        if d["kind"] == "asset_request":
            slot = next_slot(d["channel"], taken.setdefault(d["channel"], []), now, s)
            taken[d["channel"]].append(slot)
            d["slot"] = slot.isoformat()
            d["ab_split"] = {v["id"]: round(1 / len(d["variants"]), 4) for v in d["variants"]}
        else:
            d["slot"] = now.isoformat()
        updates.append(ItemUpdate(r["item_id"], "scheduled", d))
    md = {"scheduled": len(updates), "slots": {u.data.get("channel") or "budget": u.data["slot"][:16] for u in updates}}
    return commit_stage(env, "schedule", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- publishing, exactly once --------------------------------------------------------------------------------

EFFECTS = frozenset({("marketing_channels", "publish"), ("marketing_channels", "retract"),
                     ("marketing_channels", "set_budget"), ("marketing_channels", "void_budget")})
COMPENSATIONS = {**{f"publish_{v}": ("marketing_channels", "retract") for v in VARIANTS},
                 **{f"budget_{c}": ("marketing_channels", "void_budget") for c in CFG.settings.channels}}


def approved_by_person(db, item_ids: list[str]) -> set[str]:
    with db.begin() as conn:
        return set(conn.execute(sa.select(approvals.c.item_id).where(
            approvals.c.flow == FLOW, approvals.c.item_id.in_(item_ids), approvals.c.status == "approved")).scalars())


def _plan(row: dict[str, Any]) -> dict[str, Effect]:
    d, iid, tr = row["data"], row["item_id"], row["trace_id"]
    if d["kind"] == "allocation":
        return {f"budget_{c}": Effect(step_key(FLOW, row, f"budget_{c}"), "marketing_channels", "set_budget", iid, tr,
                                      {"period": d["period"], "channel": c, "amount": amount})
                for c, amount in sorted(d["allocation"].items())}
    return {f"publish_{v['id']}": Effect(step_key(FLOW, row, f"publish_{v['id']}"), "marketing_channels", "publish",
                                         iid, tr, {"channel": d["channel"], "variant": v["id"],
                                                   "topic": d["brief"]["focus_topic"],
                                                   "content": {k: x for k, x in v.items() if k != "id"}})
            for v in d["variants"]}


def publish_stage(env: StageEnv, cfg: MarketingConfig, connectors, *, now: datetime | None = None) -> StageReport:
    """Items whose slot has come are published (assets: every kept variant to its channel; allocations: the
    budgets) through the outbox with idempotency keys, exactly once; a publication failed for good retracts
    what went out (compensation) and dead-letters the item. Nothing goes out without an approval: an asset a
    person did not approve, or an allocation neither a person nor the gate approved, is dead-lettered."""
    now = now or utcnow()
    rows = load_stage_items(env, "publish")
    due = [r for r in rows if datetime.fromisoformat(r["data"]["slot"]) <= now]
    people = approved_by_person(env.db, [r["item_id"] for r in due]) if due else set()
    ok, refused = [], []
    for r in due:
        d = r["data"]
        (ok if r["item_id"] in people or (d["kind"] == "allocation" and d.get("auto_approved")) else refused).append(r)
    if refused:
        started = utcnow()
        commit_stage(env, "publish", started, [ItemUpdate(
            r["item_id"], "dead_lettered", r["data"], "dead_lettered",
            dead_letter=("unapproved", f"{r['data']['kind']} reached publishing without an approval: nothing was "
                                       "published; send it back through review (orch dlq replay)")) for r in refused],
            trace_ids={r["item_id"]: r["trace_id"] for r in refused})
    report = run_effects_stage(env, "publish", ok, connectors, plan=_plan, compensations=COMPENSATIONS,
                               policy=cfg.connector_policy, done_status="resolved",
                               done_reason="published to the channel")
    report.metadata.update({"not_due_yet": len(rows) - len(due), "refused_unapproved": len(refused)})
    return report


def publisher_stage(env: StageEnv, cfg: MarketingConfig, connectors) -> StageReport:
    """On the ops schedule: effects still in the outbox are delivered again, and every item whose slot has come
    is published (the content calendar runs itself)."""
    started = utcnow()
    sent = dispatch(env.db, connectors, env.flow, policy=cfg.connector_policy)
    rep = publish_stage(env.across_partitions(), cfg, connectors)
    md = {"redelivered": sent["delivered"], "still_failing": sent["failed"], **rep.metadata}
    return StageReport("publisher", rep.n_in, rep.outcomes, (utcnow() - started).total_seconds() * 1000.0, md)


# --- performance, re-allocation, nurture segments (ops) -----------------------------------------------------------

def _daily_by_channel(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    agg: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        a = agg.setdefault((r["date"], r["channel"]), {"spend": 0.0, "impressions": 0.0, "clicks": 0.0,
                                                       "conversions": 0.0, "revenue": 0.0})
        for k in a:
            a[k] += float(r[k])
    return [{"date": d, "channel": c, **v} for (d, c), v in sorted(agg.items())]


def _perf_md(table: list[dict[str, Any]], by: str) -> str:
    def iv(x):
        return "-" if x[0] is None or x[1] is None else f"{x[0]:.4g}-{x[1]:.4g}"

    lines = [f"| {by} | spend | conversions | CTR (90 %) | CVR (90 %) | CPA (90 %) | ROAS (90 %) |", "|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t[by] if by != 'channel/variant' else t['channel'] + '/' + t['variant']} | {t['spend']:,.0f} | "
                     f"{t['conversions']:.0f} | {t['ctr'] or 0:.2%} ({iv(t['ctr_interval'])}) | {t['cvr'] or 0:.2%} "
                     f"({iv(t['cvr_interval'])}) | {t['cpa'] or 0:,.2f} ({iv(t['cpa_interval'])}) | {t['roas'] or 0:.2f} "
                     f"({iv(t['roas_interval'])}) |")
    return "\n".join(lines)


def performance_stage(env: StageEnv, cfg: MarketingConfig, connectors) -> StageReport:
    """The channels' reported metrics (per channel, asset variant and day) as CTR, CVR, CPA and ROAS per channel
    and per variant, each with its 90 % interval (``lib.allocation.performance_table``)."""
    from ...lib import allocation  # numpy: loaded by the ops run, not by the code location

    started = utcnow()
    rows = connectors.read("marketing_channels", "metrics")
    by_channel = allocation.performance_table(rows, ("channel",))
    by_variant = allocation.performance_table(rows, ("channel", "variant"))
    md: dict[str, Any] = {"metric_rows": len(rows), "days": len({r["date"] for r in rows}),
                          "spend": round(sum(float(r["spend"]) for r in rows), 2),
                          "conversions": int(sum(int(r["conversions"]) for r in rows))}
    if rows:
        md["by_channel_md"] = _perf_md(by_channel, "channel")
        md["by_variant_md"] = _perf_md([{**t, "channel/variant": ""} for t in by_variant], "channel/variant")
        md["by_channel"] = by_channel
    return StageReport("performance", len(rows), Counter({"ok": len(rows)}), (utcnow() - started).total_seconds() * 1000.0, md)


def _allocation_proposed(db, period: str) -> bool:
    with db.begin() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(inbox).where(
            inbox.c.flow == FLOW, inbox.c.external_id == f"allocation:{period}")).scalar_one() > 0


def reallocate_stage(env: StageEnv, cfg: MarketingConfig, connectors, *, now: datetime | None = None) -> StageReport:
    """Next week's budget per channel from the evidence (Thompson sampling on conversions per unit of spend,
    ``lib.allocation.reallocate``) within the brief's guardrails (minimum share per channel, maximum shift per
    period), proposed once per week into the program's own intake; the review gate decides whether a person
    must approve it."""
    from ...lib import allocation

    started = utcnow()
    now = now or started
    s = cfg.settings
    period = iso_week(now.date() + timedelta(days=7))
    ms = lambda: (utcnow() - started).total_seconds() * 1000.0  # noqa: E731
    if _allocation_proposed(env.db, period):
        return StageReport("reallocate", 0, Counter(), ms(), {"allocation": f"{period} proposed already"})
    rows = [r for r in _daily_by_channel(connectors.read("marketing_channels", "metrics"))
            if r["channel"] in s.channels]
    if not rows:
        return StageReport("reallocate", 0, Counter(), ms(), {"allocation": "no spend reported yet: nothing to learn from"})
    budgets = connectors.read("marketing_channels", "budgets")
    current = budgets.get(iso_week(now.date())) or (budgets[max(budgets)] if budgets else None)
    g = allocation.Guardrails(min_share=s.min_share, max_shift=s.max_shift)
    seed = int(hashlib.sha256(period.encode()).hexdigest()[:8], 16)
    out = allocation.reallocate(rows, s.weekly_budget, previous=current, guardrails=g, seed=seed)
    previous = {c: v["previous"] for c, v in out.detail.items()}
    record = {"kind": "allocation", "id": f"allocation:{period}", "period": period, "budget": s.weekly_budget,
              "allocation": out.allocation, "previous": previous,
              "expected_conversions": round(out.expected_conversions, 2), "reasons": out.reasons, "detail": out.detail}
    added = hand_over(env.db, FLOW, FLOW, [record])
    md = {"period": period, "proposed": added, "allocation": out.allocation,
          "expected_conversions": round(out.expected_conversions, 2),
          "reasons_md": "\n".join(f"- **{c}** {why}" for c, why in out.reasons.items())}
    return StageReport("reallocate", 1, Counter({"ok": 1}), ms(), md)


def segments_stage(env: StageEnv, cfg: MarketingConfig, connectors) -> StageReport:
    """Audience segments for nurture: CRM contacts who clicked a campaign e-mail and did not convert, by topic,
    handed to the leads flow's intake (``segment.nurture`` events, one per contact and topic, exactly once). A
    contact who may not be e-mailed is left out (the leads flow checks consent again)."""
    started = utcnow()
    s = cfg.settings
    everything = connectors.read("marketing_channels", "engagements")
    converted = {e["contact_id"] for e in everything if e["converted"]}
    eng = [e for e in everything if e["clicked"] and not e["converted"] and e["contact_id"] not in converted]
    ids = sorted({e["contact_id"] for e in eng})
    crm = connectors.read("crm_contacts", "get", ids) if ids else {}
    tokens = [v for c in crm.values() for k in ("name", "email") if isinstance(v := c.get(k), str) and v.startswith("tok_")]
    raw = vault_lookup(env.db, tokens) if tokens else {}
    events, skipped = [], Counter()
    seen: set[tuple[str, str]] = set()
    for e in eng:
        c = crm.get(e["contact_id"])
        key = (e["contact_id"], e["topic"] or "general")
        if key in seen:
            continue
        seen.add(key)
        if c is None:
            skipped["not_in_crm"] += 1
            continue
        if c.get("do_not_email") or c.get("unsubscribed"):
            skipped["no_consent"] += 1
            continue
        email = raw.get(c.get("email"), c.get("email"))
        if not email or not EMAIL_RE.match(str(email)):  # the leads flow could not write to it either
            skipped["no_valid_email"] += 1
            continue
        events.append({"event": "segment.nurture", "id": f"{FLOW}-segment-{key[1]}-{e['contact_id']}",
                       "occurred_at": e["at"].isoformat() if hasattr(e["at"], "isoformat") else str(e["at"]),
                       "segment": {"name": "engaged_not_converted", "topic": key[1], "source_flow": FLOW},
                       "contact": {"name": raw.get(c.get("name"), c.get("name")), "email": email,
                                   "company": c.get("company"), "country": c.get("country")}})
    added = hand_over(env.db, FLOW, s.nurture_to, events) if events else 0
    md = {"engaged_not_converted": len(seen), "handed_to_nurture": len(events), "new_handovers": added,
          **{f"skipped_{k}": v for k, v in skipped.items()},
          "by_topic": dict(Counter(e["segment"]["topic"] for e in events))}
    return StageReport("segments", len(seen), Counter({"ok": len(events), "skipped": sum(skipped.values())}),
                       (utcnow() - started).total_seconds() * 1000.0, md)
