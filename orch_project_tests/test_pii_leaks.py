"""After the support flow runs on the shipped corpus through the OpenAI-compatible path, no seeded
personal value (sender names and e-mail addresses, and every card number, IBAN, SSN, IP address and
e-mail restated in a body) appears in the Dagster event log, in the model server's request bodies,
in any table of the app or connector databases outside the vault, or in the structured log.

Known gap, documented in README.md: names of third parties written in free text are not detected
offline (no statistical NER model), so they are not part of this corpus's seeded values."""

from __future__ import annotations

import ipaddress
import json
import re

import sqlalchemy as sa
from stdnum import iban, luhn

from orch_project.lib.intake import submit_to_table

from .conftest import sample_messages

CARD = re.compile(r"(?:\d[ -]?){12,18}\d")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
EMAIL = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")


def seeded_values(msgs) -> set[str]:
    vals = set()
    for m in msgs:
        vals.add(m["sender"]["email"])
        if m["sender"].get("name"):
            vals.add(m["sender"]["name"])
        text = f"{m.get('subject') or ''}\n{m['body']}"
        vals |= {x for x in CARD.findall(text) if luhn.is_valid(re.sub(r"\D", "", x))}
        vals |= {x for x in IBAN.findall(text) if iban.is_valid(x)}
        vals |= set(SSN.findall(text)) | set(EMAIL.findall(text))
        for x in IPV4.findall(text):
            try:
                ipaddress.ip_address(x)
                vals.add(x)
            except ValueError:
                pass
    return {v for v in vals if len(v) >= 5}


def dump_tables(url: str, skip: set[str]) -> str:
    eng = sa.create_engine(url)
    try:
        md = sa.MetaData()
        md.reflect(eng)
        out = []
        with eng.connect() as conn:
            for name, table in md.tables.items():
                if name not in skip:
                    out += [json.dumps(list(r), default=str) for r in conn.execute(sa.select(table))]
        return "\n".join(out)
    finally:
        eng.dispose()


def test_no_raw_personal_value_leaves_the_vault(orch_home, db, with_model, instance, fake_openai, openai_env):
    msgs = sample_messages()
    seeded = seeded_values(msgs)
    kinds = {"card": any(luhn.is_valid(re.sub(r"\D", "", v)) for v in seeded if CARD.fullmatch(v)),
             "iban": any(IBAN.fullmatch(v) for v in seeded), "ip": any(IPV4.fullmatch(v) for v in seeded),
             "restated e-mail": any(EMAIL.search(m["body"]) for m in msgs)}
    assert len(seeded) > 150 and all(kinds.values()), kinds  # the corpus really carries each kind
    submit_to_table(db, "support", msgs, "test")
    days = sorted({m["received_at"][:10] for m in msgs})
    job = openai_env.resolve_job_def("support_flow_job")
    runs = [job.execute_in_process(instance=instance, partition_key=d, raise_on_error=False) for d in days]
    bodies = json.dumps([r["body"] for r in fake_openai.requests()])
    assert all(r.success for r in runs) and len(fake_openai.requests()) >= len(msgs)

    places = {
        "dagster event log": "\n".join(str(e) for r in runs for e in instance.all_logs(r.run_id)),
        "model request bodies": bodies,
        "app database outside the vault": dump_tables(orch_home.database_url, {"vault"}),
        "connector database": dump_tables(orch_home.connectors_url, set()),
        "structured log": (orch_home.logs_dir / "orch.jsonl").read_text(),
    }
    assert all(len(text) > 1000 for text in places.values())
    leaks = {where: sorted(v for v in seeded if v in text)[:5] for where, text in places.items()}
    assert leaks == {where: [] for where in places}
    vaulted = dump_tables(orch_home.database_url, set())
    assert {m["sender"]["email"] for m in msgs} <= {v for v in seeded if v in vaulted}
