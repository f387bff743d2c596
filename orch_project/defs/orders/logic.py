"""The e-commerce order flow's configuration, contracts and intake.

Two kinds of records arrive (inbox folder: ``.json`` one record, ``.jsonl`` one per line; or inbox-table rows):

- an order (``kind: order``): order id, customer id, shipping address, items (variant ids and quantities) and
  the payment method. Prices come from the catalogue, never from the order;
- an event about an order (``kind: payment | carrier | request``) with its ``event_id``: a carrier's shipped /
  delivered / lost / returned, a payment provider's late answer, or a customer's request (cancel, change the
  address, return). The same event id twice is one event (its item id derives from it).

Personal data stays out of the items: the customer id and the address go to the vault (tokens), the flow keeps
salted references (the customer's, the address's) and the address's country and state.
"""

from __future__ import annotations

import hashlib
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...lib.contracts import aware_utc, describe_validation_error, refuse_nul
from ...lib.flows import FlowConfig
from ...lib.guardrails.pii import customer_ref
from ...lib.intake import Accepted, IntakeContext, Parsed, Rejected, parse_records_file
from .store import address_ref

FLOW = "orders"
FOLDER = Path(__file__).parent
FIRST_DAY = date(2026, 1, 1)

CARRIER_EVENTS = ("shipped", "delivered", "lost", "returned")
PAYMENT_EVENTS = ("authorized", "declined")
REQUESTS = ("cancel", "modify_address", "modify_payment", "modify_items", "return", "exchange")
CANCEL_REASONS = ("no longer needed", "ordered by mistake")


class FraudRules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    velocity_orders: int = Field(3, ge=2, description="this many orders by one customer within velocity_hours")
    velocity_hours: float = 24
    history_multiple: float = Field(3.0, gt=1, description="amount above this multiple of the customer's median order")
    history_floor: float = 100.0
    new_address_amount: float = Field(800.0, description="a high amount shipped to an address the customer never used")
    gift_card_drain: float = Field(0.9, gt=0, le=1, description="share of a gift card's balance one order uses")
    weights: dict[str, float] = Field(default_factory=lambda: {
        "velocity": 0.45, "amount_vs_history": 0.35, "new_address_high_amount": 0.4, "gift_card_drain": 0.25})
    review_at: float = Field(0.4, description="score from which a person reviews the order")
    refuse_at: float = Field(0.65, description="score from which the order is refused")


class OrderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store: str = "Sierra Outfitters"
    fraud: FraudRules = FraudRules()
    out_of_stock: Literal["cancel", "split"] = "split"
    capture_deadline_days: float = Field(7, gt=0, description="an authorisation not captured by then is voided")
    authorization_timeout_hours: float = Field(24, gt=0, description="a late authorisation not answered by then "
                                                                      "is withdrawn and the order cancelled")
    capture_grace_hours: float = Field(24, gt=0, description="a parcel out this long without a capture is a violation")
    review_after_days: float = Field(3, ge=0, description="review request this long after delivery")
    return_window_days: float = Field(30, gt=0, description="returns accepted this long after delivery")
    max_items: int = 50


class OrdersConfig(FlowConfig):
    settings_model = OrderSettings


CFG = OrdersConfig(FOLDER)


# --- contracts -------------------------------------------------------------------------------------------------

class Address(BaseModel):
    model_config = ConfigDict(extra="ignore")
    address1: str = Field(min_length=3, max_length=200)
    address2: str = Field("", max_length=200)
    city: str = Field(min_length=1, max_length=100)
    state: str = Field(min_length=1, max_length=50)
    zip: str = Field(min_length=3, max_length=12, pattern=r"^[A-Za-z0-9 -]+$")
    country: str = Field(min_length=2, max_length=60)

    @field_validator("address1", "address2", "city", "state", "zip", "country")
    @classmethod
    def _nul(cls, v: str, info) -> str:
        return refuse_nul(v, info.field_name)


class OrderLine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    item_id: str = Field(pattern=r"^\d{6,16}$")
    quantity: int = Field(1, ge=1, le=20)


class NewOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["order"] = "order"
    id: str | None = Field(None, max_length=80, description="the webhook delivery's id")
    event_id: str | None = None
    order_id: str = Field(pattern=r"^#?[A-Za-z0-9_-]{3,40}$")
    user_id: str = Field(min_length=1, max_length=80)
    address: Address
    items: list[OrderLine] = Field(min_length=1, max_length=50)
    payment_method_id: str = Field(pattern=r"^[a-z_]+_\d+$")
    created_at: datetime

    _utc = field_validator("created_at")(lambda cls, v: aware_utc(v))


class OrderEvent(BaseModel):
    """A carrier's, the payment provider's or the customer's event about an order."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["payment", "carrier", "request"]
    id: str | None = Field(None, max_length=80, description="the delivery's id (a redelivery may carry another)")
    event_id: str = Field(min_length=3, max_length=80)
    order_id: str = Field(pattern=r"^#?[A-Za-z0-9_-]{3,40}$")
    type: str = Field(max_length=32, description="carrier: shipped/delivered/lost/returned; payment: authorized/declined; "
                                                 "request: cancel/modify_address/modify_payment/modify_items/return/"
                                                 "exchange")
    occurred_at: datetime
    reason: str | None = Field(None, max_length=200)
    address: Address | None = None
    item_ids: list[str] | None = Field(None, max_length=50)
    new_item_ids: list[str] | None = Field(None, max_length=50, description="modify_items / exchange: what each "
                                                                            "of item_ids becomes")
    payment_method_id: str | None = Field(None, pattern=r"^[a-z_]+_\d+$")
    tracking_id: str | None = Field(None, max_length=40)

    _utc = field_validator("occurred_at")(lambda cls, v: aware_utc(v))

    def check(self) -> None:
        allowed = {"carrier": CARRIER_EVENTS, "payment": PAYMENT_EVENTS, "request": REQUESTS}[self.kind]
        if self.type not in allowed:
            raise ValueError(f"a {self.kind} event's type is one of {', '.join(allowed)}")
        if self.type == "modify_address" and self.address is None:
            raise ValueError("modify_address needs the new address")
        if self.type == "return" and not self.item_ids:
            raise ValueError("a return names the item_ids to return")
        if self.type == "modify_payment" and not self.payment_method_id:
            raise ValueError("modify_payment names the new payment_method_id")
        if self.type in ("modify_items", "exchange") and (not self.item_ids or not self.new_item_ids
                                                          or len(self.item_ids) != len(self.new_item_ids)):
            raise ValueError(f"{self.type} names item_ids and as many new_item_ids (what each becomes)")


def order_key(order_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", order_id)


def order_item_id(order_id: str) -> str:
    return f"order-{order_key(order_id)}"


def event_prefix(order_id: str) -> str:
    """Every event of an order has an item id under this prefix (the settle stage finds them by it)."""
    return f"evt-{order_key(order_id)}-"


def parse_file(path: Path) -> Parsed | list[Parsed]:
    return parse_records_file(path, "order or event")


def to_item(raw: dict[str, Any], ctx: IntakeContext) -> Accepted:
    row = raw.get("_row")
    where = f"line {row}: " if row is not None else ""
    rec = {k: v for k, v in raw.items() if k != "_row"}
    kind = rec.get("kind", "order")
    try:
        if kind == "order":
            o = NewOrder.model_validate(rec)
        elif kind in ("payment", "carrier", "request"):
            ev = OrderEvent.model_validate(rec)
            try:
                ev.check()
            except ValueError as exc:
                raise Rejected("validation", f"{where}{exc}") from None
        else:
            raise Rejected("unsupported", f"{where}kind {str(kind)[:30]!r} is not an order or an order event "
                                          "(order, payment, carrier, request)")
    except ValidationError as exc:
        raise Rejected("validation", where + describe_validation_error(exc)) from None
    if kind == "order":
        iid = order_item_id(o.order_id)
        return Accepted(item_id=iid, received_at=o.created_at, channel="web", data={
            "kind": "order", "order_id": o.order_id, "customer_ref": customer_ref(o.user_id, ctx.salt),
            "customer_token": ctx.vault(iid, "CUSTOMER_ID", o.user_id),
            "address_token": ctx.vault(iid, "ADDRESS", ", ".join(
                x for x in (o.address.address1, o.address.address2, o.address.city, o.address.zip) if x)),
            "address_ref": address_ref(o.address.model_dump(), ctx.salt),
            "ship_to": {"state": o.address.state, "country": o.address.country},
            "lines": [{"sku": ln.item_id, "qty": ln.quantity} for ln in o.items],
            "method_id": o.payment_method_id, "created_at": o.created_at.isoformat(), "timeline": []})
    iid = event_prefix(ev.order_id) + hashlib.sha256(ev.event_id.encode()).hexdigest()[:12]
    data: dict[str, Any] = {"kind": "event", "source": ev.kind, "type": ev.type, "event_id": ev.event_id,
                            "order_id": ev.order_id, "occurred_at": ev.occurred_at.isoformat()}
    if ev.reason:
        data["reason"] = ev.reason.strip().casefold()
    if ev.item_ids:
        data["item_ids"] = ev.item_ids
    if ev.new_item_ids:
        data["new_item_ids"] = ev.new_item_ids
    if ev.payment_method_id:
        data["method_id"] = ev.payment_method_id
    if ev.tracking_id:
        data["tracking_id"] = ev.tracking_id
    if ev.address is not None:
        data["address_token"] = ctx.vault(iid, "ADDRESS", f"{ev.address.address1}, {ev.address.city}, {ev.address.zip}")
        data["address_ref"] = address_ref(ev.address.model_dump(), ctx.salt)
        data["ship_to"] = {"state": ev.address.state, "country": ev.address.country}
    return Accepted(item_id=iid, received_at=ev.occurred_at, channel=ev.kind, data=data)
