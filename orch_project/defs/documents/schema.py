"""The documents flow's contracts: what extraction returns (the ``documents_extract`` model task's
output, the same JSON schema the OpenAI path asks for as structured output) and what a reviewer's
correction file may say.

Amounts are decimal strings ("9.00"), dates ISO strings ("2026-03-01"), currencies ISO 4217 codes;
every field carries a confidence in [0, 1] and the document lines it was read from (``lines``: line
indices; the stage turns them into page, line and box).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ...lib.contracts import LLMOutput

FIELDS = ("vendor", "address", "tax_id", "number", "date", "currency", "subtotal", "tax", "total")
AMOUNT_FIELDS = ("subtotal", "tax", "total")


class FieldValue(BaseModel):
    """One extracted field: its value (None when not found), a confidence and where it was read."""

    model_config = ConfigDict(extra="ignore")
    value: str | None = None
    confidence: float = Field(0.0, ge=0.0, le=1.0)
    lines: list[int] = Field(default_factory=list, description="indices of the document lines it came from")


class LineItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    description: str
    quantity: str | None = None
    unit_price: str | None = None
    amount: str | None = None
    confidence: float = Field(0.0, ge=0.0, le=1.0)
    lines: list[int] = Field(default_factory=list)


class ExtractionOutput(LLMOutput):
    """The extraction contract: the invoice or receipt header fields and its line items."""

    vendor: FieldValue = Field(default_factory=FieldValue, description="the seller's name as printed")
    address: FieldValue = Field(default_factory=FieldValue, description="the seller's address as printed")
    tax_id: FieldValue = Field(default_factory=FieldValue, description="the seller's tax / registration id")
    number: FieldValue = Field(default_factory=FieldValue, description="invoice or receipt number")
    date: FieldValue = Field(default_factory=FieldValue, description="document date, ISO YYYY-MM-DD")
    currency: FieldValue = Field(default_factory=FieldValue, description="ISO 4217 code")
    subtotal: FieldValue = Field(default_factory=FieldValue, description="amount before tax, decimal string")
    tax: FieldValue = Field(default_factory=FieldValue, description="tax amount, decimal string")
    total: FieldValue = Field(default_factory=FieldValue, description="amount due, decimal string")
    line_items: list[LineItem] = Field(default_factory=list)
