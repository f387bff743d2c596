"""The intake sensor evaluated with build_sensor_context, cursor included."""

from __future__ import annotations

import json

import dagster as dg

from orch_project.defs.resources import default_resources
from orch_project.lib.intake import submit_to_table

from .conftest import QUIET, run_flow, sample_messages, support_inbox, write_file


def _tick(defs, instance, cursor):
    sensor = defs.get_sensor_def("support_intake_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                 resources=default_resources()) as ctx:
        return sensor.evaluate_tick(ctx)


def test_sensor_micro_batches_by_day_and_never_reads_twice(orch_home, db, defs, instance):
    msgs = sample_messages()
    submit_to_table(db, "support", msgs[:60], "test")  # 50 on the 19th, 10 on the 20th
    file_msg = dict(msgs[70], id="file-msg-1")
    write_file(support_inbox(orch_home), "a.json", json.dumps(file_msg).encode())

    first = _tick(defs, instance, None)
    reqs = {r.partition_key: r for r in first.run_requests}
    assert set(reqs) == {"2026-11-19", "2026-11-20"}, "one run per day, not one per message"
    assert reqs["2026-11-19"].tags["orch/new_sources"] == "50"
    assert reqs["2026-11-20"].tags["orch/new_sources"] == "11"
    assert all(r.run_key.startswith("support-intake:") for r in first.run_requests)
    cursor = json.loads(first.cursor)
    assert cursor["table"] > 0 and cursor["file"][1] == "a.json"

    second = _tick(defs, instance, first.cursor)
    assert not second.run_requests and "no new messages" in second.skip_message

    # new arrivals after the cursor: only they are requested
    submit_to_table(db, "support", msgs[60:65], "test")
    write_file(support_inbox(orch_home), "b.json", json.dumps(dict(msgs[71], id="file-msg-2")).encode())
    third = _tick(defs, instance, second.cursor or first.cursor)
    assert [(r.partition_key, r.tags["orch/new_sources"]) for r in third.run_requests] == [("2026-11-20", "6")]
    assert third.run_requests[0].run_key not in {r.run_key for r in first.run_requests}


def test_sensor_puts_undated_bad_files_on_their_arrival_day(orch_home, db, defs, instance):
    write_file(support_inbox(orch_home), "broken.json", b"{not json")
    result = _tick(defs, instance, None)
    assert len(result.run_requests) == 1
    from datetime import datetime, timezone

    assert result.run_requests[0].partition_key == datetime.now(timezone.utc).date().isoformat()


def test_ops_sensor_requests_the_ops_job_after_a_successful_flow_run(orch_home, db, with_model, defs, instance):
    sensor = defs.get_sensor_def("support_ops_after_flow")
    assert {t.job_name for t in sensor.targets} == {"support_ops_job"}

    def tick(cursor):
        with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as ctx:
            return sensor.evaluate_tick(ctx)

    first = tick(None)  # a new sensor starts from the present: nothing yet
    assert first.run_requests == []
    submit_to_table(db, "support", sample_messages("2026-11-20")[:3], "test")
    flow = run_flow(defs, instance, "2026-11-20")
    assert flow.success
    ops = defs.resolve_job_def("support_ops_job").execute_in_process(instance=instance, run_config=QUIET)
    assert ops.success  # a successful run of another job must not trigger it

    after = tick(first.cursor)
    assert [r.run_key for r in after.run_requests] == [f"ops-after:{flow.run_id}"]  # for the sensor's target job
    assert tick(after.cursor).run_requests == []  # each flow run triggers once
