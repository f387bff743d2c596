"""Chaos drill (d): malformed inputs. At least 10,000 inputs generated with ``hypothesis`` go through the
support flow's intake stage:

- inbox files (.json / .eml): random bytes, and random text;
- inbox-table rows: a valid InboundMessage mutated (fields dropped, wrong types - nulls, numbers, lists,
  objects, strings where objects belong -, bodies over the 100,000-character limit, control characters
  and NULs in text fields, unknown channels, bad e-mail addresses, naive or garbage dates), arbitrary
  JSON values that are not objects, and text that is not JSON.

    .venv/bin/python benchmarks/drill_malformed_inputs.py [--inputs N] [--seed S]

Asserts: intake never crashes; every input is in the intake log exactly once (accepted, duplicate or
dead_lettered); every rejected input has a dlq row (stage intake) with an error type and a reason that
names fields without echoing the input's values; nothing is lost (lib.pipeline.status_counts); a second intake
run (re-execution) reads nothing again. Some mutations leave a message valid (e.g. control characters
other than NUL are allowed text): those are accepted as items, reported as ``resolved``. The drill
runs intake alone, which has no outside effects: ``duplicate_effects`` is there to keep the drills'
JSON alike and can only be 0 here.

Progress goes to stderr; the last line on stdout is one JSON object:

    {"drill": "malformed_inputs", "items", "resolved", "dead_lettered", "lost", "duplicate_effects", ...}

Exit code 1 if an assertion fails (the JSON line then says which in "failures").
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_process import say, work_env  # noqa: E402

DAY = "2026-11-20"
SECRET_EMAIL = "zq.secret.sender@example.com"
SECRET_BODY = "zqmarker my card was blocked at the shop yesterday"
TEMPLATE = {"id": "", "channel": "email", "received_at": f"{DAY}T10:00:00Z",
            "sender": {"name": "Zqa Marker", "email": SECRET_EMAIL}, "subject": "zqmarker card blocked",
            "body": SECRET_BODY, "attachments": [{"filename": "a.pdf", "content_type": "application/pdf",
                                                  "size_bytes": 10}]}
FIELDS = ["id", "channel", "received_at", "sender", "sender.email", "sender.name", "subject", "body", "attachments",
          "attachments.0", "attachments.0.size_bytes", "attachments.0.filename"]
TEXT_FIELDS = ["id", "subject", "body", "sender.name", "sender.email", "channel", "received_at"]


# --- generation --------------------------------------------------------------------------------

def strategies():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
        st.text(max_size=40)
    json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=8)
    control = st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=12)
    mutation = st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(FIELDS)),
        st.tuples(st.just("wrong_type"), st.sampled_from(FIELDS), json_values),
        st.tuples(st.just("huge_body"), st.integers(100_001, 130_000)),
        st.tuples(st.just("control_chars"), st.sampled_from(TEXT_FIELDS), control),
        st.tuples(st.just("text"), st.sampled_from(TEXT_FIELDS), st.text(max_size=60)),
    )
    row = st.one_of(
        st.tuples(st.just("table_mutated"), st.lists(mutation, min_size=1, max_size=3)),
        st.tuples(st.just("table_json"), json_values.filter(lambda v: not isinstance(v, dict))),
        st.tuples(st.just("table_json"), st.dictionaries(st.text(max_size=10), json_values, max_size=6)),
        st.tuples(st.just("table_text"), st.text(max_size=200)),
    )
    files = st.one_of(
        st.tuples(st.just("file_bytes"), st.sampled_from([".json", ".eml"]), st.binary(max_size=3000)),
        st.tuples(st.just("file_text"), st.sampled_from([".json", ".eml"]), st.text(max_size=400)),
        st.tuples(st.just("file_mutated"), st.sampled_from([".json"]), st.lists(mutation, min_size=1, max_size=3)),
    )
    return st.one_of(files, row)


def generate(n: int, seed: int) -> list[tuple]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    specs: list[tuple] = []
    rounds = 0
    while len(specs) < n and rounds < 20:
        @hseed(seed + rounds)
        @settings(max_examples=n - len(specs), database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategies())
        def collect(spec):
            specs.append(spec)

        collect()
        rounds += 1
    return specs[:n]


def _set(obj: dict, path: str, value, *, drop: bool = False) -> None:
    parts = path.split(".")
    cur = obj
    for p in parts[:-1]:
        key = int(p) if isinstance(cur, list) else p
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            return
        if not isinstance(cur, (dict, list)):
            return
    last = parts[-1]
    if isinstance(cur, list):
        if not last.isdigit() or int(last) >= len(cur):
            return
        if drop:
            cur.pop(int(last))
        else:
            cur[int(last)] = value
    elif drop:
        cur.pop(last, None)
    else:
        cur[last] = value


def mutated(k: int, mutations: list[tuple]) -> dict:
    msg = copy.deepcopy(TEMPLATE)
    msg["id"] = f"mal-{k:05d}"
    for m in mutations:
        kind = m[0]
        if kind == "drop":
            _set(msg, m[1], None, drop=True)
        elif kind == "wrong_type":
            _set(msg, m[1], m[2])
        elif kind == "huge_body":
            msg["body"] = ("zqmarker " * (m[1] // 9 + 1))[: m[1]]
        elif kind == "control_chars":
            _set(msg, m[1], f"zq{m[2]}marker")
        elif kind == "text":
            _set(msg, m[1], m[2])
    return msg


def materialise(k: int, spec: tuple) -> tuple[str, str, bytes | str]:
    """(where, name-or-suffix, content): where is 'file' (bytes) or 'table' (payload text)."""
    kind = spec[0]
    if kind == "file_bytes":
        return "file", spec[1], spec[2]
    if kind == "file_text":
        return "file", spec[1], spec[2].encode("utf-8", "surrogatepass")
    if kind == "file_mutated":
        return "file", spec[1], json.dumps(mutated(k, spec[2])).encode()
    if kind == "table_mutated":
        return "table", "", json.dumps(mutated(k, spec[1]))
    if kind == "table_json":
        return "table", "", json.dumps(spec[1])
    return "table", "", spec[1]  # table_text


# --- the drill -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=4)
    args = ap.parse_args(argv)
    if args.inputs <= 0:
        ap.error("--inputs must be positive")
    with tempfile.TemporaryDirectory(prefix="drill_malformed_") as tmp:
        work_env(Path(tmp))
        return run(args)


def run(args) -> int:
    import sqlalchemy as sa

    from orch_project.defs.resources import Connectors, reset_process_caches
    from orch_project.defs.support import logic
    from orch_project.lib.pipeline import status_counts
    from orch_project.defs.support.flow import CFG
    from orch_project.lib.intake import drop_file
    from orch_project.lib.pipeline import StageEnv
    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database, dlq, inbox, intake, utcnow

    reset_process_caches()
    s = Settings.from_env().ensure_dirs()
    db = Database(s.database_url)
    t0 = time.perf_counter()
    specs = generate(args.inputs, args.seed)
    gen_s = time.perf_counter() - t0
    kinds = Counter(sp[0] for sp in specs)
    say(f"drill malformed_inputs: {len(specs)} inputs generated in {gen_s:.1f} s: {dict(kinds)}")

    expected_keys: set[str] = set()
    rows = []
    now = utcnow()
    for k, spec in enumerate(specs):
        where, suffix, content = materialise(k, spec)
        if where == "file":
            name = f"mal-{k:05d}{suffix}"
            if not drop_file(s.inbox_dir, name, content):
                raise SystemExit(f"inbox file {name} already exists")
            expected_keys.add(f"file:{name}")
        else:
            rows.append({"flow": logic.FLOW, "external_id": None, "payload": content, "submitted_at": now,
                         "submitted_by": "drill"})
    with db.begin() as conn:
        for row in rows:  # one by one to learn each row's id (the table's source key)
            rid = conn.execute(inbox.insert().values(**row)).inserted_primary_key[0]
            expected_keys.add(f"table:{rid}")
    n = len(expected_keys)
    say(f"    {n - len(rows)} inbox files, {len(rows)} inbox-table rows")

    today = utcnow().date()
    days = [(logic.FIRST_DAY + timedelta(days=i)).isoformat() for i in range((today - logic.FIRST_DAY).days + 2)]
    env = StageEnv(db, logic.FLOW, days, run_id="drill-malformed")
    failures: list[str] = []
    t1 = time.perf_counter()
    crash = None
    try:
        rep = logic.intake_stage(env, CFG, s.inbox_dir, s.pii_salt, today=today)
        say(f"    intake: {rep.n_in} sources, outcomes {dict(rep.outcomes)}, {time.perf_counter() - t1:.1f} s")
        rep2 = logic.intake_stage(StageEnv(db, logic.FLOW, days, run_id="drill-malformed-2"), CFG, s.inbox_dir,
                                  s.pii_salt, today=today)
    except Exception as exc:  # the drill's point: this must not happen
        crash = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()
        failures.append("intake crashed")
        rep2 = None
    intake_s = time.perf_counter() - t1

    with db.begin() as conn:
        log = dict(conn.execute(sa.select(intake.c.source_key, intake.c.outcome)
                                .where(intake.c.flow == logic.FLOW)).all())
        dead = {r.source_key: r for r in conn.execute(sa.select(dlq.c.source_key, dlq.c.error_type, dlq.c.reason,
                                                                dlq.c.stage, dlq.c.item_id))}
    st = status_counts(db, "support")
    outcomes = Counter(log.values())
    missing = expected_keys - set(log)
    rejected = {k for k, o in log.items() if o == "dead_lettered"}
    no_dlq = [k for k in rejected if k not in dead]
    unclear = [k for k in rejected if k in dead and (not (dead[k].reason or "").strip() or not dead[k].error_type
                                                     or dead[k].stage != "intake")]
    echoes = [k for k, r in dead.items() if "zqmarker" in (r.reason or "").lower() or SECRET_EMAIL in (r.reason or "")]
    max_reason = max((len(r.reason or "") for r in dead.values()), default=0)
    if missing:
        failures.append(f"{len(missing)} inputs not in the intake log, e.g. {sorted(missing)[:3]}")
    if no_dlq:
        failures.append(f"{len(no_dlq)} rejected inputs without a dlq row, e.g. {sorted(no_dlq)[:3]}")
    if unclear:
        failures.append(f"{len(unclear)} dlq rows without a clear reason, e.g. {sorted(unclear)[:3]}")
    if echoes:
        failures.append(f"{len(echoes)} dlq reasons echo input values, e.g. {sorted(echoes)[:3]}")
    if st["lost"]:
        failures.append(f"{st['lost']} inputs lost (status_counts)")
    if rep2 is not None and rep2.n_in:
        failures.append(f"re-execution read {rep2.n_in} sources again")
    dups = Connectors().client().duplicates()
    result = {
        "drill": "malformed_inputs", "items": n, "resolved": outcomes.get("accepted", 0),
        "dead_lettered": outcomes.get("dead_lettered", 0), "lost": st["lost"],
        "duplicate_effects": sum(dups.values()), "duplicates": outcomes.get("duplicate", 0),
        "rejected_without_dlq": len(no_dlq), "unclear_reasons": len(unclear), "reasons_echoing_values": len(echoes),
        "not_in_intake_log": len(missing), "reexecution_sources_read": rep2.n_in if rep2 is not None else None,
        "crash": crash, "inbox_files": n - len(rows), "inbox_table_rows": len(rows),
        "input_kinds": dict(sorted(kinds.items())),
        "error_types": dict(Counter(r.error_type for r in dead.values()).most_common()),
        "max_reason_chars": max_reason, "generate_seconds": round(gen_s, 1), "intake_seconds": round(intake_s, 1),
        "failures": failures, "ok": not failures,
    }
    print(json.dumps(result), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
