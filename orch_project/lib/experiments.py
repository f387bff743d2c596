"""A/B tests behind feature flags: a configured share of items, chosen stably by item id, takes a
variant of a model step (another prompt version); the KPI report compares the arms' outcomes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONTROL = "control"


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    step: str = Field(description="the model step (gateway task) the variant applies to")
    variant: str = Field(pattern=r"^[a-z0-9_]+$", description="prompt variant id: prompts/<step>.<variant>.txt")
    share: float = Field(ge=0.0, le=1.0, description="share of items in the variant arm")

    def arm(self, name: str, item_id: str) -> str:
        """``variant`` or ``control``; the same item always lands in the same arm."""
        if not self.enabled or self.share <= 0:
            return CONTROL
        h = int.from_bytes(hashlib.sha256(f"{name}:{item_id}".encode()).digest()[:8], "big") / 2**64
        return self.variant if h < self.share else CONTROL


def load_experiments(path: Path) -> dict[str, Experiment]:
    if not Path(path).exists():
        return {}
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return {name: Experiment.model_validate(spec) for name, spec in raw.items()}


def active_for(experiments: dict[str, Experiment], step: str) -> tuple[str, Experiment] | None:
    """The enabled experiment on ``step`` (at most one per step runs at a time)."""
    found = [(n, e) for n, e in experiments.items() if e.enabled and e.step == step]
    if len(found) > 1:
        raise ValueError(f"more than one enabled experiment on step {step!r}: {[n for n, _ in found]}")
    return found[0] if found else None
