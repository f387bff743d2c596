"""The dead-letter queue in Dagster: ``dlq_replay_job`` puts dead-lettered items back into the flow
(config {dlq_id: int | null, all: bool}); the next run of the item's partition reprocesses it.
``support_dlq_backlog`` shows the open dead letters by stage and error type."""


import dagster as dg
from pydantic import Field

from ...lib import dlq as dlq_lib
from ..resources import AppDatabase
from . import logic
from .assets import support_outbox_redelivery


def backlog_metadata(db) -> dict:
    rows = dlq_lib.open_backlog(db, logic.FLOW)
    md: dict = {"dlq_open": sum(r["count"] for r in rows)}
    by_stage: dict[str, int] = {}
    by_error: dict[str, int] = {}
    for r in rows:
        by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + r["count"]
        by_error[r["error_type"]] = by_error.get(r["error_type"], 0) + r["count"]
    md.update({f"dlq_open_stage_{k}": v for k, v in sorted(by_stage.items())})
    md.update({f"dlq_open_error_{k}": v for k, v in sorted(by_error.items())})
    table = "| stage | error type | open |\n|---|---|---|\n" + "\n".join(
        f"| {r['stage']} | {r['error_type']} | {r['count']} |" for r in rows)
    md["backlog"] = dg.MetadataValue.md(table if rows else "no open dead letters")
    return md


@dg.asset(group_name="support_ops", kinds={"python"}, deps=[support_outbox_redelivery],
          description="Open dead letters by stage and error type (numeric metadata + a table), counted after the "
                      "outbox redelivery (which dead-letters effects failed for good). Replay with "
                      "`orch dlq replay ID|--all` or dlq_replay_job; intake dead letters need the source fixed.")
def support_dlq_backlog(app_db: AppDatabase) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=backlog_metadata(app_db.database()))


class DLQReplayConfig(dg.Config):
    dlq_id: int | None = Field(None, description="the dead letter to replay (see `orch dlq list`)")
    all: bool = Field(False, description="replay every open, replayable dead letter of the support flow")


@dg.op(description="Replay dead letters: items go back to the status their failed stage loads (trace id kept, "
                   "dlq row marked replayed, audited); then records the DLQ backlog.")
def replay_dead_letters(context: dg.OpExecutionContext, config: DLQReplayConfig, app_db: AppDatabase) -> dict:
    db = app_db.database()
    if (config.dlq_id is None) == (not config.all):
        raise dg.Failure("set exactly one of dlq_id or all: true")
    actor = f"dagster:{context.run_id}"
    if config.all:
        out = dlq_lib.replay_all(db, logic.FLOW, actor=actor, run_id=context.run_id)
        msg = out["message"]
        replayed = out["replayed"]
    else:
        try:
            out = dlq_lib.replay(db, config.dlq_id, actor=actor, run_id=context.run_id)
        except dlq_lib.DLQError as exc:
            raise dg.Failure(str(exc)) from exc
        if not out["replayed"] and not out["noop"]:
            raise dg.Failure(out["message"])
        msg = out["message"]
        replayed = int(out["replayed"])
    context.log.info(msg)
    context.log_event(dg.AssetMaterialization(asset_key=support_dlq_backlog.key, metadata=backlog_metadata(db)))
    context.add_output_metadata({"replayed": replayed, "message": msg})
    return out


@dg.job(description="Replay dead letters (config {dlq_id: int | null, all: bool}); the next support_flow_job run "
                    "of each item's partition reprocesses it.", tags={"orch/flow": "support"})
def dlq_replay_job():
    replay_dead_letters()
