"""Seeded sample data of the marketing program (``python -m orch_project.defs.marketing.sample_data``
regenerates ``samples/``): two weeks of social posts about Northwind Bank (one JSON-lines feed per day, with
complaints, outage reports, other people's handles and contact details, spam, bots, a copy-paste campaign
and posts in other languages), broken feed lines, and four weeks of the channels' reporting of earlier
campaigns (``channel_history.csv``: date, channel, asset, variant, impressions, clicks, conversions, spend,
revenue) drawn from known true rates.

The demo's world (``demo_world``) plays the marketing manager (approves the assets, keeps one variant of
one, rejects one, approves a large budget shift) and the e-mail platform's engagement report (newsletter
subscribers who clicked an earlier campaign, a few of whom converted).
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
import json
import random
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

SAMPLES_DIR = Path(__file__).parent / "samples"
START = date(2026, 11, 16)   # a Monday: two ISO weeks, 2026-W47 and 2026-W48
DAYS = 14
HISTORY_DAYS = 28            # the channels' reporting before the feed's second week ends
SEED = 15
# the channels' true rates the history is drawn from (the benchmark's kind of world): click-through per
# impression by variant, conversion per click, impressions per unit of spend, revenue per conversion
TRUE = {"email": {"ctr": {"A": 0.030, "B": 0.036}, "cvr": 0.060, "imp_per_spend": 40.0},
        "social": {"ctr": {"A": 0.012, "B": 0.010}, "cvr": 0.020, "imp_per_spend": 90.0},
        "search_ads": {"ctr": {"A": 0.040, "B": 0.046}, "cvr": 0.055, "imp_per_spend": 12.0}}
SHARE = {"email": 0.2, "social": 0.4, "search_ads": 0.4}
WEEKLY = 7000.0
REVENUE_PER_CONVERSION = 60.0

POSITIVE = {
    "cards": ["Paid with my @northwindbank card in three shops today and contactless just works. Love it",
              "The new metal card from Northwind Bank arrived, looks great and Apple Pay set up in a minute",
              "Lost my card, froze it in the app, new card here in two days. @northwindbank you're good"],
    "app": ["The Northwind app update is so much faster, nice work @northwindbank",
            "Face ID login on the @northwindbank app is smooth now, finally",
            "Really like the spending notifications in the Northwind Bank app"],
    "savings": ["Opened a savings pot with @northwindbank for the holidays, the round-ups add up fast",
                "Northwind Bank savings interest rate went up, nice surprise this morning",
                "Hit my savings goal thanks to the Northwind savings pots, so happy"],
    "transfers": ["Instant transfer to my landlord with @northwindbank, done in seconds",
                  "Set up a standing order in the Northwind app in under a minute, easy"],
    "travel": ["Using my @northwindbank card abroad in Lisbon, great exchange rate and no faff",
               "Travel money sorted with Northwind Bank, the holiday currency wallet is brilliant",
               "Back from holiday, paying abroad with the Northwind card was so easy",
               "Northwind Bank exchange rate beat the airport by miles on our holiday"],
}
NEUTRAL = {
    "cards": ["Does the @northwindbank card work with Google Pay yet?", "How long does a replacement card take with Northwind Bank?"],
    "app": ["Is there a new Northwind app update this week?", "Where do I find statements in the @northwindbank app?"],
    "savings": ["What is the Northwind Bank savings interest rate now?", "Can I have two savings pots with @northwindbank?"],
    "transfers": ["Does @northwindbank charge for SEPA transfers?", "How do I add a payee in the Northwind app?"],
    "travel": ["Does the Northwind card charge a fee abroad?", "Which currency does @northwindbank use for travel payments?"],
    "fees": ["What is the overdraft fee at Northwind Bank?"],
}
COMPLAINTS = [
    ("cards", "@northwindbank my card was declined twice at the supermarket today, unacceptable"),
    ("fees", "Charged twice for one payment and nobody answers the chat @northwindhelp. Worst service"),
    ("transfers", "Still waiting for my refund from @northwindbank after three weeks, this is a joke"),
    ("cards", "My card is blocked again and I can't get through to anyone at Northwind Bank. Never again"),
    ("fees", "Northwind Bank charged me an overdraft fee I never agreed to, I want a refund"),
]
OUTAGES = ["Is the @northwindbank app down? It is not loading since this morning",
           "Northwind online banking not working again, error code 503 on every page",
           "@northwindhelp the app keeps crashing when I open payments"]
EMERGENT = ["Northwind Bank sponsoring the #CityMarathon this year, nice to see",
            "Saw the Northwind Bank #CityMarathon stand, free water for runners",
            "The #CityMarathon cheer zone by @northwindbank was loud!"]
WITH_PII = ["@northwindbank my card was declined twice, please call me on 07700 900123 or mail jo.bloggs@example.com",
            "Told @sarah_k about the Northwind savings pots, she switched today"]
SPAM = ["Crypto giveaway!!! DM me for 100x returns http://x.example/a http://y.example/b http://z.example/c",
        "Get free followers now, click here http://followers.example #follow #like #f4f #bank #money #win #free"]
COPYPASTA = "Northwind Bank is closing branches and nobody told us, share this before they delete it"
FOREIGN = [("es", "¿Por qué mi tarjeta de Northwind Bank no funciona en el extranjero?"),
           ("fr", "Je suis très déçu du service client de Northwind Bank, aucune réponse"),
           ("de", "Die neue Northwind App ist wirklich gut, schnelle Überweisungen")]
COMPETITOR = ["Southbank just launched cashback on their card, tempting", "Eastgate Bank app is down again, typical",
              "Switched to Southbank for the savings rate", "Eastgate Bank travel card fees are too high"]
PLATFORMS = ["x", "instagram", "reddit", "facebook"]
FIRST = ["amy", "ben", "cara", "dev", "eli", "fay", "gus", "hana", "ivan", "jo", "kai", "lena", "max", "nia",
         "omar", "pia", "raj", "sol", "tom", "uma", "vic", "wes", "yara", "zed"]


def _author(rng: random.Random) -> str:
    return f"@{rng.choice(FIRST)}_{rng.choice(['runs', 'writes', 'codes', 'travels', 'x', 'uk', 'home'])}{rng.randint(1, 99)}"


def _metrics(rng: random.Random, *, bot: bool = False) -> dict[str, Any]:
    if bot:
        return {"likes": 0, "reposts": rng.randint(0, 2), "replies": 0, "author_followers": rng.randint(0, 8),
                "author_following": rng.randint(1500, 4000), "author_posts_24h": rng.randint(150, 600),
                "author_account_age_days": rng.randint(0, 2)}
    return {"likes": rng.randint(0, 60), "reposts": rng.randint(0, 12), "replies": rng.randint(0, 6),
            "author_followers": rng.randint(20, 3000), "author_following": rng.randint(20, 800),
            "author_posts_24h": rng.randint(0, 12), "author_account_age_days": rng.randint(60, 4000)}


def generate(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """``{day: posts}`` for the feed's fourteen days."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, Any]]] = {}
    n = 0
    for i in range(DAYS):
        day = START + timedelta(days=i)
        week2 = i >= 7
        posts: list[tuple[str, dict[str, Any] | None, str | None]] = []
        weights = {"cards": 3, "app": 3, "savings": 2, "transfers": 2, "travel": 4 if week2 else 1}
        for _ in range(9):
            theme = rng.choices(list(weights), weights=list(weights.values()))[0]
            posts.append((rng.choice(POSITIVE[theme]), None, None))
        for _ in range(4):
            theme = rng.choice(list(NEUTRAL))
            posts.append((rng.choice(NEUTRAL[theme]), None, None))
        posts.append((COMPLAINTS[i % len(COMPLAINTS)][1], None, None))
        if i in (9, 10):  # an outage in the second week
            posts += [(t, None, None) for t in OUTAGES]
        if i % 4 == 1:
            posts.append((EMERGENT[(i // 4) % len(EMERGENT)], None, None))
        if i in (3, 11):
            posts.append((WITH_PII[0 if i == 3 else 1], None, None))
        if i % 3 == 0:
            posts.append((SPAM[(i // 3) % 2], None, None))
        posts.append((COMPETITOR[i % len(COMPETITOR)], None, None))
        if i % 5 == 2:
            posts.append(("Big thanks @northwindbank, follow back pls #bank", _metrics(rng, bot=True), None))
        if i == 6:
            posts += [(COPYPASTA, None, None) for _ in range(3)]
        if i % 4 == 3:
            lang, text = FOREIGN[(i // 4) % len(FOREIGN)]
            posts.append((text, None, lang))
        day_posts = []
        for text, metrics, lang in posts:
            n += 1
            at = datetime(day.year, day.month, day.day, rng.randint(7, 22), rng.randint(0, 59), tzinfo=timezone.utc)
            bot = metrics is not None
            author = f"@promo{rng.randint(10_000_000, 99_999_999)}" if bot else _author(rng)
            rec = {"id": f"p{n:05d}", "platform": rng.choice(PLATFORMS), "author": author, "text": text,
                   "created_at": at.isoformat().replace("+00:00", "Z"), "metrics": metrics or _metrics(rng)}
            if lang:
                rec["lang"] = lang
            day_posts.append(rec)
        day_posts.sort(key=lambda r: r["created_at"])
        out[day.isoformat()] = day_posts
    return out


def history(seed: int = SEED) -> list[dict[str, Any]]:
    """Four weeks of the channels' daily reporting (two variants each), from ``TRUE``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    end = START + timedelta(days=DAYS - 1)
    rows = []
    for i in range(HISTORY_DAYS):
        day = end - timedelta(days=HISTORY_DAYS - 1 - i)
        week = f"{day.isocalendar()[0]}-W{day.isocalendar()[1]:02d}"
        for ch, t in TRUE.items():
            for v in ("A", "B"):
                spend = round(WEEKLY * SHARE[ch] / 7 / 2, 2)
                imp = int(rng.poisson(spend * t["imp_per_spend"]))
                clicks = int(rng.binomial(imp, t["ctr"][v]))
                conv = int(rng.binomial(clicks, t["cvr"]))
                rows.append({"date": day.isoformat(), "channel": ch, "asset": f"history-{ch}-{week}", "variant": v,
                             "topic": "cards" if i < 14 else "savings", "impressions": imp, "clicks": clicks,
                             "conversions": conv, "spend": spend, "revenue": round(conv * REVENUE_PER_CONVERSION, 2)})
    return rows


def write_samples(folder: Path = SAMPLES_DIR) -> dict[str, int]:
    feed = folder / "feed"
    feed.mkdir(parents=True, exist_ok=True)
    days = generate()
    for day, posts in days.items():
        (feed / f"feed-{day}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in posts),
                                                encoding="utf-8")
    bad = folder / "malformed"
    bad.mkdir(exist_ok=True)
    good = {"id": "m00001", "platform": "x", "author": "@fine_user", "text": "The Northwind app is fine today",
            "created_at": f"{START.isoformat()}T10:00:00Z"}
    (bad / "feed-broken.jsonl").write_text("\n".join([
        json.dumps(good), '{"id": "m00002", "platform": "x", "author": "@cut_off", "text": "half a li',
        json.dumps({"id": "m00003", "platform": "x", "text": "no author or time"}),
        json.dumps({**good, "id": "m00004", "kind": "press_release"}), "[1, 2, 3]"]) + "\n", encoding="utf-8")
    rows = history()
    with (folder / "channel_history.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"days": len(days), "posts": sum(len(p) for p in days.values()), "history_rows": len(rows)}


# --- the demo ----------------------------------------------------------------------------------------------

def _chance(key: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def load_history(connectors_db) -> int:
    """The channels' reporting of earlier campaigns, and the budgets in force in the feed's last week."""
    from ...lib.connectors.embedded import Effect
    from .logic import CHANNELS, channel_metrics, ensure_tables

    with (SAMPLES_DIR / "channel_history.csv").open(encoding="utf-8") as fh:
        rows = [{**r, **{k: int(r[k]) for k in ("impressions", "clicks", "conversions")},
                 **{k: float(r[k]) for k in ("spend", "revenue")}} for r in csv.DictReader(fh)]
    with connectors_db.begin() as conn:
        ensure_tables(conn)
        before = conn.execute(channel_metrics.select().with_only_columns(channel_metrics.c.id)).all()
        connectors_db.insert_ignore(conn, channel_metrics, rows, ["date", "channel", "asset", "variant"])
        after = conn.execute(channel_metrics.select().with_only_columns(channel_metrics.c.id)).all()
        last = START + timedelta(days=DAYS - 1)
        period = f"{last.isocalendar()[0]}-W{last.isocalendar()[1]:02d}"
        CHANNELS.handlers["set_budget"](conn, [
            Effect(f"history:budget:{period}:{c}", "marketing_channels", "set_budget", f"history-{period}", "",
                   {"period": period, "channel": c, "amount": round(WEEKLY * SHARE[c], 2)}) for c in SHARE])
    return len(after) - len(before)


SUBSCRIBERS = [("Ada", "Quist", "Quist Labs"), ("Bruno", "Marlowe", "Marlowe Freight"), ("Carla", "Okonjo", "Okonjo Health"),
               ("Dmitri", "Varga", "Varga Studio"), ("Elif", "Tanaka", "Tanaka Foods"), ("Farah", "Delacroix", "Delacroix Law"),
               ("Goran", "Nyberg", "Nyberg Tools"), ("Hana", "Castell", "Castell Media"), ("Ivo", "Ruiz", "Ruiz Energy"),
               ("Juno", "Abara", "Abara Textiles"), ("Kemal", "Lind", "Lind Robotics"), ("Lotte", "Brandt", "Brandt Optics")]


def subscribers() -> list[dict[str, Any]]:
    """The newsletter list the e-mail campaigns reach: CRM contacts of the program's own (fictitious people)."""
    out = []
    for n, (first, last, company) in enumerate(SUBSCRIBERS, 1):
        domain = company.lower().replace(" ", "") + ".com"
        out.append({"contact_id": f"newsletter-{n:03d}", "name": f"{first} {last}",
                    "email": f"{first.lower()}.{last.lower()}@{domain}", "company": company, "country": "GB",
                    "stage": "Lead", "source": "newsletter", "unsubscribed": n == 4})
    return out


def seed_demo(submit) -> dict:
    """The Atlas CRM (when the data directory has it) and the newsletter list, the channels' history,
    the feed folder and the broken feed, and a few posts through the inbox table."""
    from ...lib import datasets
    from ...lib.connectors.embedded import import_contacts
    from ...lib.settings import Settings
    from ..resources import _embedded

    s = Settings.from_env()
    conn_db = _embedded(s.connectors_url).db
    try:
        crm_added = import_contacts(conn_db, datasets.atlas_crm()[0])
    except datasets.DatasetMissing:
        crm_added = 0
    crm_added += import_contacts(conn_db, subscribers())
    counts = submit([SAMPLES_DIR / "feed", SAMPLES_DIR / "malformed"])
    counts["channel_history_rows"] = load_history(conn_db)
    counts["crm_contacts_imported"] = crm_added
    return counts


def demo_world(settings, db) -> str:
    """Between the flow run and the ops job: the marketing manager decides what waits (approves the assets,
    keeps only variant A of the e-mail, rejects the ad copy once; approves a budget shift), and the e-mail
    platform reports who clicked the earlier campaign (CRM contacts; some converted). Only what has not
    happened yet happens: a second run adds nothing."""
    import sqlalchemy as sa

    from ...lib import approvals as hitl
    from ...lib.store import items
    from ..resources import _embedded
    from .logic import CFG, FLOW, channel_engagements, ensure_tables

    decided: Counter = Counter()
    for row in sorted(hitl.pending(db, FLOW), key=lambda r: r["item_id"]):
        with db.begin() as conn:
            data = conn.execute(sa.select(items.c.data).where(items.c.flow == FLOW, items.c.item_id == row["item_id"])
                                ).scalar_one()
        edit, decision, why = None, "approve", "on brief, checked"
        if data["kind"] == "allocation":
            why = "the evidence supports the shift"
        elif data["channel"] == "email" and len(data["variants"]) > 1:
            edit, why = "keep: [A]\n", "variant A only: B's subject reads as clickbait"
        elif data["channel"] == "search_ads":
            decision, why = "reject", "headline too generic for search; brief it again next week"
        hitl.decide(db, row["item_id"], decision, "mm-maya", why, edit, CFG.roster, flow=FLOW)
        decided[decision] += 1
    client = _embedded(settings.connectors_url)
    rows = []
    now = datetime.now(timezone.utc)
    for cid in sorted(c["contact_id"] for c in subscribers()):
        if _chance(cid, "clicked") < 0.6:
            rows.append({"contact_id": cid, "asset": "history-email-2026-W48", "topic": "savings", "clicked": True,
                         "converted": _chance(cid, "converted") < 0.25, "at": now})
    with client.db.begin() as conn:
        ensure_tables(conn)
        before = conn.execute(sa.select(sa.func.count()).select_from(channel_engagements)).scalar_one()
        client.db.insert_ignore(conn, channel_engagements, rows, ["contact_id", "asset"])
        added = conn.execute(sa.select(sa.func.count()).select_from(channel_engagements)).scalar_one() - before
    return (f"the marketing manager approves {decided.get('approve', 0)} and rejects {decided.get('reject', 0)} "
            f"waiting items; the e-mail platform reports {added} contacts who clicked the last campaign")


def demo_weeks(settings, db) -> list[str]:
    """The week partition the demo briefs: the latest complete ISO week with listened posts (its Monday)."""
    from ...lib.pipeline import StageEnv
    from .logic import FLOW, week_days
    from .program import _post_weeks

    weeks = sorted(w for w in _post_weeks(StageEnv(db, FLOW, [])) if week_days(w)[-1] < datetime.now(timezone.utc).date())
    return [week_days(weeks[-1])[0].isoformat()] if weeks else []


def demo_summary(settings) -> list[tuple[str, str]]:
    import sqlalchemy as sa

    from ...lib.store import Database, inbox
    from ..resources import _embedded
    from .logic import FLOW, channel_budgets, channel_publications

    db = _embedded(settings.connectors_url).db
    with db.begin() as conn:
        pubs = conn.execute(sa.select(sa.func.count()).select_from(channel_publications).where(
            channel_publications.c.idempotency_key.like(f"{FLOW}:%"))).scalar_one()
        budgets = conn.execute(sa.select(channel_budgets.c.period, sa.func.count()).where(
            channel_budgets.c.idempotency_key.like(f"{FLOW}:%"), channel_budgets.c.status == "active")
            .group_by(channel_budgets.c.period)).all()
    app = Database(settings.database_url)
    with app.begin() as conn:
        handed = dict(conn.execute(sa.select(inbox.c.flow, sa.func.count()).where(
            inbox.c.submitted_by == f"flow:{FLOW}", inbox.c.flow != FLOW).group_by(inbox.c.flow)).all())
    return [("hand-overs", f"{handed.get('support', 0)} complaints to support, {handed.get('leads', 0)} contacts "
                           "to leads nurture"),
            ("channels", f"{pubs} publications, budgets set for {', '.join(p for p, _ in budgets) or 'no period yet'}")]


if __name__ == "__main__":
    print(write_samples())
