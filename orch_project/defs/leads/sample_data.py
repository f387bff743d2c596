"""Seeded sample data of the leads flow, and what the demo does around it.

    python -m orch_project.defs.leads.sample_data        # rewrites samples/ (deterministic)

samples/ holds:
- ``company_directory.csv``: the embedded company directory (e-mail domain -> company, industry, size, country);
- ``inbox/``: web-form submissions (``form-*.json``) and one CSV import of many leads (``import-*.csv``) with
  three bad rows, a person typed twice with other case and spacing, consent flags (do-not-email,
  do-not-call, unsubscribed) and a disposable address; the form fields a lead-handling export has (the
  scorer's columns, from the generated history's generator, without the outcome);
- ``inbox_table.jsonl``: CRM webhook events (contact.created / lead.created), one of an unsupported type and
  one without a contact;
- ``malformed/``: an empty form, a form that is not JSON, a binary "CSV" and an import with a header only.

All people, companies, domains and numbers are invented (Faker with a fixed seed, phonenumbers' example
ranges). The demo also imports the Atlas workspace's CRM from the data directory as the starting CRM
(``$ORCH_DATA_DIR/workbench``, when present) and submits three leads that overlap it (one by phone, one by
name and company that a person must decide, one with a do-not-email contact).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path
from typing import Any

SAMPLES_DIR = Path(__file__).parent / "samples"
SEED = 20261207
INDUSTRIES = ["Software", "Healthcare", "Banking", "Retail", "Logistics", "Education", "Manufacturing", "Media",
              "Energy", "Hospitality", "Consulting", "Public sector"]
COUNTRIES = ["GB", "DE", "FR", "ES", "NL", "SE", "IE", "IN", "SG", "AU", "US", "CA", "BR", "AE", "ZA"]
TITLES = ["Chief Operating Officer", "VP Sales", "Head of Learning", "HR Director", "Operations Manager",
          "Team Lead", "Software Engineer", "Analyst", "Student", "Marketing Coordinator", "Founder & CEO",
          "Training Manager", "Consultant", "", "Account Executive"]
SUFFIXES = ["Labs", "Systems", "Logistics", "Health", "Partners", "Group", "Analytics", "Works", "Foods", "Energy"]
TLDS = [".com", ".io", ".co.uk", ".de", ".eu", ".net"]
FREE_MAIL = ["gmail.com", "outlook.com", "yahoo.co.uk", "web.de", "hotmail.fr"]


def _phone(rng: random.Random, region: str) -> str:
    import phonenumbers

    ex = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE) or \
        phonenumbers.example_number(region)
    national = str(ex.national_number)
    for _ in range(40):  # six random digits: a million numbers per country, so two leads rarely share one
        cand = national[:-6] + "".join(str(rng.randrange(10)) for _ in range(6))
        num = phonenumbers.parse(f"+{ex.country_code}{cand}")
        if phonenumbers.is_valid_number(num):
            return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    return phonenumbers.format_number(ex, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


def company_directory(rng: random.Random, n: int = 60) -> list[dict[str, Any]]:
    from faker import Faker

    from ...lib.fakedata import slug

    fake = Faker()
    fake.seed_instance(rng.randrange(10**9))
    out, seen = [], set()
    while len(out) < n:
        stem = fake.last_name().replace("'", "")
        name = f"{stem} {rng.choice(SUFFIXES)}"
        domain = slug(stem + name.split()[-1]) + rng.choice(TLDS)
        if domain in seen:
            continue
        seen.add(domain)
        size = rng.choice([12, 40, 85, 150, 300, 800, 1500, 3200, 7500, 22000])
        out.append({"domain": domain, "name": name, "industry": rng.choice(INDUSTRIES), "employees": size,
                    "country": rng.choice(COUNTRIES)})
    return out


def _history_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Form fields of ``n`` leads as a lead-handling export has them (the generated history's columns, minus
    the outcome, the ids and what the sales team fills in after contact)."""
    from .history_data import ID_COLUMN, LABEL_COLUMN, QUALIFICATION_COLUMNS, generate_history

    df = generate_history(n, seed)
    # lean towards leads that converted in the history, so the demo has hot leads to route
    order = sorted(range(n), key=lambda i: (-int(df[LABEL_COLUMN].iloc[i]), i))
    df = df.iloc[order[: n // 2] + order[n // 2:]].drop(columns=[LABEL_COLUMN, ID_COLUMN, "Lead Number",
                                                                 *QUALIFICATION_COLUMNS])
    rows = []
    for rec in df.to_dict("records"):
        rows.append({k: ("" if v is None or (isinstance(v, float) and v != v) else v) for k, v in rec.items()})
    return rows


LOCALES = ("en_GB", "en_US", "de_DE", "fr_FR", "es_ES", "en_IN")


def _fakers(seed: int) -> list:
    """One seeded Faker per locale (a multi-locale Faker picks its locale with the global random state, so
    its output would change from run to run)."""
    from faker import Faker

    out = []
    for n, loc in enumerate(LOCALES):
        f = Faker(loc)
        f.seed_instance(seed + n)
        out.append(f)
    return out


def _person(rng: random.Random, fakers: list, directory: list[dict[str, Any]]) -> dict[str, Any]:
    from ...lib.fakedata import slug

    fake = rng.choice(fakers)
    first, last = fake.first_name(), fake.last_name()
    if rng.random() < 0.65:
        comp = rng.choice(directory)
        email = f"{slug(first)}.{slug(last)}@{comp['domain']}"
        company, country = comp["name"], comp["country"]
    else:
        email = f"{slug(first)}{slug(last)}{rng.randrange(10, 99)}@{rng.choice(FREE_MAIL)}"
        company, country = (fake.company().replace("\n", " ") if rng.random() < 0.4 else ""), rng.choice(COUNTRIES)
    return {"first_name": first, "last_name": last, "email": email, "phone": _phone(rng, country),
            "company": company, "title": rng.choice(TITLES), "country": country}


IMPORT_IDENTITY = ["First Name", "Last Name", "Email", "Phone", "Company", "Job Title"]


def import_rows(people: list[dict[str, Any]], attrs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of a CSV import: who each person is, the scorer's columns as the export names them,
    and the country code last."""
    attr_cols = list(attrs[0])
    header = [*IMPORT_IDENTITY, *attr_cols, "Country Code"]
    rows = [[p["first_name"], p["last_name"], p["email"], p["phone"], p["company"], p["title"],
             *[a.get(c, "") for c in attr_cols], p["country"]] for p, a in zip(people, attrs)]
    return header, rows


def generate_import(path: Path, n: int, seed: int = SEED) -> Path:
    """A CSV import of ``n`` generated leads (benchmarks: the 10,000-row import)."""
    rng = random.Random(seed)
    fakers = _fakers(seed)
    with (SAMPLES_DIR / "company_directory.csv").open(encoding="utf-8") as fh:
        directory = list(csv.DictReader(fh))
    header, rows = import_rows([_person(rng, fakers, directory) for _ in range(n)], _history_rows(n, seed % 1000))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def generate(out: Path = SAMPLES_DIR, seed: int = SEED) -> dict[str, int]:
    """Write the flow's samples (deterministic for a seed); returns counts."""
    rng = random.Random(seed)
    fakers = _fakers(seed)
    directory = company_directory(rng)
    inbox, malformed = out / "inbox", out / "malformed"
    for d in (inbox, malformed):
        d.mkdir(parents=True, exist_ok=True)
        for p in d.iterdir():
            p.unlink()
    with (out / "company_directory.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["domain", "name", "industry", "employees", "country"])
        w.writeheader()
        w.writerows(directory)
    attrs = _history_rows(160, seed % 1000)
    people = [_person(rng, fakers, directory) for _ in range(110)]
    # web forms: 36 leads, a few with consent flags, one disposable address
    for i in range(36):
        p, a = people[i], attrs[i]
        form = {"id": f"wf-{1000 + i}", **p, "attributes": a}
        if i == 3:
            form["do_not_email"] = True
        if i == 5:
            form["unsubscribed"] = True
        if i == 7:
            form["do_not_call"] = "yes"
        if i == 9:
            form["email"] = f"{p['email'].split('@')[0]}@mailinator.com"
        (inbox / f"form-{1000 + i}.json").write_text(json.dumps(form, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
    # one CSV import of 60 leads: the scorer's columns as the export names them, plus who the person is
    header, rows = import_rows(people[36:96], attrs[36:96])
    attr_cols = list(attrs[0])
    twice = people[0]  # typed again in the import: other case and spacing (the match stage merges them)
    rows[10] = [f"  {twice['first_name'].upper()} ", twice["last_name"].lower(), f" {twice['email'].upper()}  ",
                twice["phone"].replace(" ", ""), twice["company"], twice["title"],
                *[attrs[0][c] for c in attr_cols], twice["country"]]
    rows[20][2], rows[20][3] = "", ""  # no way to reach the lead
    rows[30][2] = "not-an-address@@example"
    rows[40][header.index("Do Not Email")] = "maybe"
    with (inbox / "import-2026-12.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    # CRM webhook events in the inbox table
    events = []
    for k in range(12):
        p, a = people[96 + k], attrs[96 + k]
        events.append({"event": "lead.created" if k % 2 else "contact.created", "id": f"evt-{5000 + k}",
                       "contact": {**p, "attributes": a}})
    events.append({"event": "deal.deleted", "id": "evt-5100", "contact": {"email": "x@example.org"}})
    events.append({"event": "lead.created", "id": "evt-5101"})
    (out / "inbox_table.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events),
                                           encoding="utf-8")
    (malformed / "form-empty.json").write_bytes(b"")
    (malformed / "form-broken.json").write_text('{"first_name": "Ada", "email": ', encoding="utf-8")
    (malformed / "import-binary.csv").write_bytes(b"First Name,Email\n\x00\x01\x02\xff\n")
    (malformed / "import-header-only.csv").write_text("First Name,Last Name,Email\n", encoding="utf-8")
    return {"forms": 36, "import_rows": len(rows), "table_events": len(events), "malformed": 4,
            "directory": len(directory)}


# --- the demo ---------------------------------------------------------------------------------------

def import_atlas_crm(connectors_db) -> tuple[int, list[dict[str, Any]]]:
    """The Atlas workspace's CRM (``$ORCH_DATA_DIR/workbench``, MIT, fictitious people) as the starting CRM:
    200 contacts with owner, stage and notes. Returns (added, the contacts read); nothing when the data
    directory does not have it."""
    from ...lib import datasets
    from ...lib.connectors.embedded import import_contacts

    try:
        rows, crm = datasets.atlas_crm()
    except datasets.DatasetMissing:
        return 0, []
    return import_contacts(connectors_db, rows), crm


def overlap_events(crm: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Three new leads that the Atlas CRM already knows, as CRM webhook events: the same phone typed
    another way (merged), a close name at the same company (a person decides), and one whose contact
    unsubscribed in the CRM (the lead inherits it)."""
    with_phone = [r for r in crm if r["customer_phone"]]
    if len(with_phone) < 3:
        return []
    a, b, c = with_phone[0], with_phone[1], with_phone[2]
    first_b, last_b = b["customer_name"].split(" ", 1)
    attrs = {"Lead Origin": "Lead Add Form", "Lead Source": "Reference", "Total Time Spent on Website": "900",
             "Last Activity": "SMS Sent", "Current Occupation": "Working Professional"}
    digits = "".join(ch for ch in a["customer_phone"] if ch.isdigit())
    return [
        {"event": "lead.created", "id": "atlas-overlap-1", "contact": {
            "name": a["customer_name"], "phone": f"+1 ({digits[:3]}) {digits[3:6]} {digits[6:]}", "country": "US",
            "company": a["customer_email"].split("@")[-1].title(), "attributes": attrs}},
        {"event": "lead.created", "id": "atlas-overlap-2", "contact": {
            "first_name": first_b, "last_name": last_b[:-1] + ("y" if last_b[-1] != "y" else "i"),
            "email": f"{first_b.lower()}@{b['customer_email'].split('@')[-1]}-group.com", "country": "US",
            "company": b["customer_email"].split("@")[-1].title(), "attributes": attrs}},
        {"event": "lead.created", "id": "atlas-overlap-3", "contact": {
            "name": c["customer_name"], "phone": c["customer_phone"], "country": "US",
            "email": f"{c['customer_name'].lower().replace(' ', '.')}@{c['customer_email'].split('@')[-1]}.com",
            "company": c["customer_email"].split("@")[-1].title(), "attributes": attrs}},
    ]


def seed_demo(submit) -> dict:
    """The starting CRM (Atlas, when the data directory has it), then the inbox samples, the malformed
    ones, the CRM webhook events and the leads that overlap the CRM."""
    from ...lib.connectors.embedded import crm_contacts
    from ...lib.settings import Settings
    from ..resources import _embedded

    s = Settings.from_env()
    conn_db = _embedded(s.connectors_url).db
    added, crm = import_atlas_crm(conn_db)
    with_phone = [r for r in crm if r["customer_phone"]]
    if len(with_phone) >= 3:  # the third overlap's contact unsubscribed in the CRM; the lead inherits it
        with conn_db.begin() as conn:
            conn.execute(crm_contacts.update().where(crm_contacts.c.contact_id == f"atlas-{with_phone[2]['customer_id']}")
                         .values(unsubscribed=True))
    counts = submit([SAMPLES_DIR / "inbox", SAMPLES_DIR / "malformed", SAMPLES_DIR / "inbox_table.jsonl"])
    if crm:
        extra = s.home / "demo" / "leads_crm_overlap.jsonl"
        extra.parent.mkdir(parents=True, exist_ok=True)
        extra.write_text("".join(json.dumps(e) + "\n" for e in overlap_events(crm)), encoding="utf-8")
        more = submit([extra])
        counts = {k: counts[k] + more[k] for k in counts}
    counts["crm_contacts_imported"] = added
    if not crm:
        counts["crm_note"] = "no Atlas CRM (set ORCH_DATA_DIR to the folder holding workbench/): starting CRM empty"
    return counts


def _chance(item_id: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{item_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def demo_world(settings, db) -> str:
    """Between the flow run and the ops job: the sales manager decides the waiting leads, leads answer the
    messages they got (replies, one unsubscribe, one bounce), and reps close deals in the CRM (won with a
    probability equal to the lead's score). Only what has not happened yet happens: a second run adds nothing."""
    import sqlalchemy as sa

    from ...lib import approvals as hitl
    from ...lib.connectors.embedded import Effect
    from ...lib.store import items, utcnow
    from ..resources import _embedded
    from . import logic

    decided = 0
    for row in sorted(hitl.pending(db, logic.FLOW), key=lambda r: r["item_id"]):
        with db.begin() as conn:
            data = conn.execute(sa.select(items.c.data).where(items.c.flow == logic.FLOW,
                                                              items.c.item_id == row["item_id"])).scalar_one()
        reasons = data.get("approval_reasons") or []
        edit, decision, why = None, "approve", "checked"
        if "uncertain_match" in reasons:
            edit, why = "match: merge\n", "same person: the CRM contact changed jobs within the group"
        elif "no_rep_capacity" in reasons:
            edit = f"owner: {logic.CFG.reps[0]['id']}\n"
        elif "low_confidence" in reasons and _chance(row["item_id"], "reject") < 0.3:
            decision, why = "reject", "not a fit for the programme (checked the form)"
        hitl.decide(db, row["item_id"], decision, "sm-grace", why, edit, logic.CFG.roster, flow=logic.FLOW)
        decided += 1
    client = _embedded(settings.connectors_url)
    with db.begin() as conn:
        resolved = [(iid, d) for iid, d in conn.execute(sa.select(items.c.item_id, items.c.data).where(
            items.c.flow == logic.FLOW, items.c.status == "resolved")).all()]
    now = utcnow()
    events, outcomes = [], []
    written = [(iid, d) for iid, d in resolved if d.get("channel") == "email" and d.get("tier") in ("hot", "warm")]
    for n, (iid, d) in enumerate(sorted(written)):
        token = d["tokens"]["EMAIL_ADDRESS"]
        roll = _chance(iid, "reply")
        kind = "unsubscribe" if n == 1 else "bounce" if n == 2 else "reply" if roll < 0.2 + 0.4 * d["score"] else None
        if kind is not None:
            events.append({"external_id": f"demo-{kind}-{iid}", "kind": kind, "recipient": token,
                           "body": "Thanks, please call me on Tuesday." if kind == "reply" else None,
                           "received_at": now})
    for iid, d in sorted(resolved):
        if d.get("tier") in ("hot", "warm") and _chance(iid, "decided") < 0.7:
            won = _chance(iid, "won") < float(d["score"])
            outcomes.append(Effect(f"crm-ui:{iid}:outcome", "crm_contacts", "set_stage", iid, "",
                                   {"contact_id": d["match"]["contact_id"], "stage": "Won" if won else "Lost"}))
    added = client.record_inbound(events)
    if outcomes:
        client.deliver("crm_contacts", outcomes)
    return (f"the sales manager decides {decided} waiting leads; {added} replies/bounces/unsubscribes arrive; "
            f"reps record {len(outcomes)} deal outcomes in the CRM")


def demo_summary(settings) -> list[tuple[str, str]]:
    import sqlalchemy as sa

    from ...lib.connectors.embedded import crm_contact_changes, crm_contacts, messages
    from ..resources import _embedded

    db = _embedded(settings.connectors_url).db
    with db.begin() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(crm_contacts)).scalar_one()
        created = conn.execute(sa.select(sa.func.count()).select_from(crm_contacts).where(
            crm_contacts.c.source.like("lead:%"))).scalar_one()
        upserts = conn.execute(sa.select(sa.func.count()).select_from(crm_contact_changes).where(
            crm_contact_changes.c.action == "upsert_contact", crm_contact_changes.c.idempotency_key.like("leads:%"))
                               ).scalar_one()
        kinds = dict(conn.execute(sa.select(messages.c.kind, sa.func.count()).where(
            messages.c.idempotency_key.like("leads:%")).group_by(messages.c.kind)).all())
    nurture = sum(v for k, v in kinds.items() if str(k).startswith("nurture"))
    return [("CRM", f"{total} contacts ({created} created by the flow), {upserts} lead upserts"),
            ("messages", f"first touches {kinds.get('first_touch', 0)}, nurture steps {nurture}")]


if __name__ == "__main__":
    print(generate())
