"""The e-commerce order flow on the flow kit: one spec, the kit builds the Dagster objects.

orders:  orders_intake -> validate -> fraud (a person reviews the grey zone) -> reserve -> authorize -> fulfil
         -> settle (the durable wait: carriers, customer requests, deadlines)
events:  orders_intake -> validate (recorded; each order's settle step applies them)
ops:     advance (every partition: redelivery, arrived events, passed deadlines)
"""

from __future__ import annotations

from typing import Any

from ...kit import GXCheck, build_flow
from ...lib.flows import DemoSpec, FlowSpec, IntakeSpec, OpsStage, ReviewSpec, Stage, lazy
from . import logic, saga
from .store import SYSTEMS


def _invariants_frame(db, flow: str, days: list[str], cfg) -> Any:
    import pandas as pd

    from ...lib.settings import Settings
    from ..resources import _embedded
    from .invariants import audit

    report = audit(db, _embedded(Settings.from_env().connectors_url).db, cfg, flow)
    return pd.DataFrame(report["rows"] or [], columns=["item_id", "violations"])


def _invariants_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeUnique(column="item_id"),
            gxe.ExpectColumnValuesToBeInSet(column="violations", value_set=[""])]


SPEC = FlowSpec(
    name=logic.FLOW,
    folder=logic.FOLDER,
    title="E-commerce orders",
    config=logic.CFG,
    first_day=logic.FIRST_DAY,
    intake=IntakeSpec(
        to_item=logic.to_item, suffixes=(".jsonl", ".json"), parse_file=logic.parse_file, text_fields=(),
        description="New orders (webhook rows in the inbox table, files in the inbox folder) and events about "
                    "orders (carrier, payment, customer requests), contract-validated; a broken line is "
                    "dead-lettered with its number, the same event id twice is one event; the customer id and "
                    "addresses go to the vault."),
    stages=[
        Stage("validate", loads="received", sets="valid", routes=("resolved",), fn=saga.validate_stage,
              kind="connector",
              description="Events are recorded for their order. An order is checked against the shop: the "
                          "customer exists, the payment method is theirs, the items are catalogue variants; prices "
                          "and amount from the catalogue; what breaks a rule goes to the DLQ with the rules."),
        Stage("fraud", loads="valid", sets="cleared", branches=("awaiting_review",), routes=("resolved",),
              fn=saga.fraud_stage, kind="connector",
              description="Rules (velocity, amount against the customer's history, a high amount to a new "
                          "address, gift-card drain) and their score: cleared, a person reviews the grey zone, "
                          "refused from the brief's threshold (the customer told why)."),
        Stage("reserve", loads="cleared", sets="reserved", routes=("resolved",), fn=saga.reserve_stage,
              kind="connector", waits=True,
              description="Stock reserved in the inventory; short -> the lines in stock go on and the rest are "
                          "dropped (brief: split) or the order is cancelled; compensation: release."),
        Stage("authorize", loads="reserved", sets="authorized", routes=("resolved",), fn=saga.authorize_stage,
              kind="connector", waits=True,
              description="The amount authorised on the customer's payment method; declined -> the reservation "
                          "released and the customer told; compensation: void."),
        Stage("fulfil", loads="authorized", sets="in_fulfilment", routes=("resolved",), fn=saga.fulfil_stage,
              kind="connector", waits=True,
              description="A fulfilment request to the warehouse (tracking id); the customer told the order is "
                          "confirmed; compensation: stop the parcel (cancel_fulfilment)."),
        Stage("settle", loads=saga.SETTLE_LOADS, sets="resolved",
              routes=("shipped", "delivered", "return_requested", "exchange_requested"),
              fn=saga.settle_stage, kind="connector", waits=True,
              description="The durable wait: carrier events (shipped -> capture + commit stock; delivered -> a "
                          "review request later; lost -> refund), customer requests per the store's policy "
                          "(cancel, new address, payment method or items while pending; return -> refund + "
                          "restock on receipt; exchange -> the replacement ships when the return arrives) and "
                          "deadlines (an authorisation not captured in time is voided)."),
    ],
    ops=[
        OpsStage("advance", fn=saga.advance_stage, kind="connector", after=("settle",),
                 description="Every partition: effects still in the outbox go out again, waiting orders take the "
                             "events that arrived and the deadlines that passed."),
    ],
    effects=saga.EFFECTS,
    compensations=saga.COMPENSATIONS,
    systems=list(SYSTEMS),
    review=ReviewSpec(fields=("order_id", "amount", "lines", "method_source", "ship_to", "fraud")),
    checks=[GXCheck("settle", "settle_invariants",
                    "Great Expectations over every order and the payment, warehouse and inventory records: no capture "
                    "without a shipment or refund, no shipment without a capture, refunds within captures, no stale "
                    "reservation, every cancelled order compensated.", _invariants_frame, _invariants_expectations)],
    report=lazy(f"{__package__}.reporting:kpi_report"),
    demo=DemoSpec(seed=lazy(f"{__package__}.sample_data:seed_demo"),
                  before_ops=lazy(f"{__package__}.sample_data:demo_world"),
                  summary=lazy(f"{__package__}.sample_data:demo_summary"), rounds=6),
)

defs = build_flow(SPEC)
