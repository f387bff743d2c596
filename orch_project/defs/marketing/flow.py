"""The marketing program on the flow kit: one spec, the kit builds the Dagster objects.

posts:       marketing_intake -> screen -> sentiment -> topics -> handoff (complaints to support)
assets:                          screen -> compose -> brand_check -> review_gate -> schedule -> publish
allocations:                     screen ---------------------------> review_gate -> schedule -> publish
ops:         publisher (the calendar publishes when a slot comes), performance, reallocate (next week's
             budget), segments (nurture audiences to the leads flow)
weekly:      idea_brief (one partition per ISO week, marketing_weekly_job)
"""

from __future__ import annotations

from typing import Any

from ...kit import GXCheck, build_flow, items_frame
from ...lib.flows import DemoSpec, FlowSpec, IntakeSpec, ModelTask, OpsStage, ReviewSpec, Stage, lazy
from . import logic, program, reporting


def _frame(db, flow: str, days: list[str], keep) -> Any:
    from ...lib.store import items

    return items_frame(db, flow, days, keep, items.c.status != "dead_lettered")


def _sentiment_frame(db, flow: str, days: list[str], cfg) -> Any:
    return _frame(db, flow, days, lambda r: {"item_id": r.item_id, "label": r.data["sentiment"]["label"],
                                             "score": r.data["sentiment"]["score"]}
                  if r.data.get("sentiment") else None)


def _sentiment_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeUnique(column="item_id"),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=["negative", "neutral", "positive"]),
            gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0)]


def _copy_frame(db, flow: str, days: list[str], cfg) -> Any:
    s = cfg.settings

    def keep(r):
        d = r.data
        if d.get("kind") != "asset_request" or "refused_variants" not in d:
            return None
        return {"item_id": r.item_id, "clean_variants": len(d["variants"]),
                "all_pass_policy": all(not program.violations(v, d["channel"], s) for v in d["variants"])}
    return _frame(db, flow, days, keep)


def _copy_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeUnique(column="item_id"),
            gxe.ExpectColumnValuesToBeInSet(column="all_pass_policy", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="clean_variants", min_value=0, max_value=3)]


SPEC = FlowSpec(
    name=logic.FLOW,
    folder=logic.FOLDER,
    title="Marketing program",
    config=logic.CFG,
    first_day=logic.FIRST_DAY,
    intake=IntakeSpec(
        to_item=logic.to_item, suffixes=(".jsonl", ".json"), parse_file=logic.parse_file,
        text_fields=("text",), asset="intake",
        description="Social posts and mentions from JSON-lines feeds in the inbox folder and inbox-table rows (one "
                    "post per line: id, platform, author, text, created_at, metrics; a broken line is dead-lettered "
                    "with its number while the rest go on), and the program's own records (asset requests from the "
                    "weekly brief, budget allocations): validated, the author's handle only in the vault, other "
                    "people's handles and PII masked."),
    stages=[
        Stage("screen", loads="received", sets="screened", routes=("resolved", "requested", "proposed"),
              fn=logic.screen_stage,
              description="Language (py3langid), spam (the brief's phrases, links, hashtags, one text from several "
                          "authors) and bots (author signals): a filtered post is resolved with its reason; asset "
                          "requests and allocations go down their own part of the chain."),
        Stage("sentiment", loads="screened", sets="scored", fn=logic.sentiment_stage, kind="model",
              tasks=(logic.SENTIMENT_TASK,), logic_version=logic.STEP_LOGIC_VERSION["sentiment"],
              description="Negative / neutral / positive with the label's probability through the gateway (task "
                          "marketing_sentiment: lexicons plus a classifier trained on labelled tweets)."),
        Stage("topics", loads="scored", sets="topical", fn=logic.topics_stage,
              description="Topic per post (the brief's themes by keyword, else the post's keyphrase: ids stable "
                          "across partitions) and urgency (outage report, or a negative post with a complaint cue)."),
        Stage("handoff", loads="topical", sets="resolved", fn=logic.handoff_stage, waits=True,
              description="Complaints and outage reports become support intake events through the platform, one "
                          "per post however often this runs; every post is then resolved."),
        Stage("compose", loads="requested", sets="composed", fn=program.compose_stage, kind="model", after="screen",
              tasks=(program.COPY_TASK,), logic_version=logic.STEP_LOGIC_VERSION["compose"],
              description="Copy variants A/B per channel from the week's brief through the gateway (task "
                          "marketing_copy): e-mail subject and body, social post, ad headline and description."),
        Stage("brand_check", loads="composed", sets="checked", routes=("rejected",), fn=program.brand_check_stage,
              description="Length per channel, the channel's required disclaimer, the brief's banned claims, no "
                          "personal data: a breaking variant is kept out with its reasons; no clean variant -> "
                          "refused."),
        Stage("review_gate", loads=("checked", "proposed"), sets="approved", branches=("awaiting_review",),
              fn=program.review_gate_stage,
              description="Every asset waits for the marketing manager (roles and audit from the approvals queue); "
                          "a budget allocation waits when it moves a channel by more than the brief's threshold."),
        Stage("schedule", loads="approved", sets="scheduled", fn=program.schedule_stage,
              description="The content calendar: the channel's next free slot within its rate limit, minimum gap "
                          "and outside quiet hours; an allocation takes effect now."),
        Stage("publish", loads="scheduled", sets="resolved", fn=program.publish_stage, kind="connector", waits=True,
              description="When the slot comes: every kept variant to its channel (or the budgets), through the "
                          "outbox, exactly once; only what a person (or, for budgets, the gate) approved."),
    ],
    ops=[
        OpsStage("publisher", fn=program.publisher_stage, kind="connector", after=("publish",),
                 description="On the ops schedule: publishes every scheduled item whose slot has come and redelivers "
                             "what the outbox still holds."),
        OpsStage("idea_brief", fn=program.idea_brief_stage, kind="model", after=("topics",), partitions="weekly",
                 description="Weekly partition (ISO week, scheduled when the week is over, backfillable): top and "
                             "rising topics with evidence (mentions, growth, sentiment shift, masked quotes) -> a brief "
                             "(objective, audience, message, channels) through the gateway -> one asset request per "
                             "channel."),
        OpsStage("performance", fn=program.performance_stage, kind="connector", after=("publisher",),
                 description="The channels' metrics per channel, variant and day: CTR, CVR, CPA and ROAS with 90 % "
                             "intervals."),
        OpsStage("reallocate", fn=program.reallocate_stage, kind="connector", after=("performance",),
                 description="Next week's budget by Thompson sampling on conversions per unit of spend within the "
                             "guardrails (minimum share, maximum shift); proposed once a week to the review gate."),
        OpsStage("segments", fn=program.segments_stage, kind="connector", after=("performance",),
                 description="Contacts who clicked and did not convert, by topic, handed to the leads flow's nurture "
                             "(segment.nurture events, once per contact and topic)."),
    ],
    model_tasks={logic.SENTIMENT_TASK: ModelTask(output=logic.SentimentOutput, local=logic.sentiment_local_task,
                                                 label_choices=lambda: ("negative", "neutral", "positive")),
                 program.BRIEF_TASK: ModelTask(output=program.BriefOutput, local=program.brief_local_task),
                 program.COPY_TASK: ModelTask(output=program.CopyOutput, local=program.copy_local_task)},
    effects=program.EFFECTS,
    compensations=program.COMPENSATIONS,
    systems=[logic.CHANNELS],
    review=ReviewSpec(fields=("kind", "channel", "week", "variants", "refused_variants", "allocation", "previous",
                              "max_shift", "reasons"),
                      apply_edit=program.apply_review, edit_label="changes", mask_edit=False),
    checks=[
        GXCheck("sentiment", "sentiment_labels_valid",
                "Great Expectations on scored posts: unique ids, a known label, a probability in [0, 1].",
                _sentiment_frame, _sentiment_expectations),
        GXCheck("brand_check", "copy_passes_brand_policy",
                "Great Expectations on checked assets: every variant left for review passes the brand policy "
                "(length, disclaimer, banned claims, personal data).", _copy_frame, _copy_expectations),
    ],
    report=reporting.kpi_report,
    demo=DemoSpec(seed=lazy(f"{__package__}.sample_data:seed_demo"),
                  before_ops=lazy(f"{__package__}.sample_data:demo_world"),
                  summary=lazy(f"{__package__}.sample_data:demo_summary"), rounds=2, feeds=("support", "leads"),
                  weeks=lazy(f"{__package__}.sample_data:demo_weeks")),
)

defs = build_flow(SPEC)
