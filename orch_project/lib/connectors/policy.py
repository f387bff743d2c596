"""Resilience settings for the connectors a flow writes to (its ``connectors.yaml``): a circuit
breaker per connector (the same DB-backed ``CircuitBreaker`` the LLM gateway uses, keys
``connector:<name>``), a per-delivery timeout, how many delivery attempts an effect gets before it
is treated as failed for good (and its item compensated), and how alerts are de-duplicated."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..llm.routing import BreakerPolicy


class AlertPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(3600.0, gt=0, description="the same breach raises at most once per window")


class ConnectorPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    circuit_breaker: BreakerPolicy = BreakerPolicy(failure_threshold=3, cooldown_s=60.0, half_open_probes=1)
    timeout_s: float = Field(30.0, gt=0, description="one connector call (a batch of effects)")
    max_attempts: int = Field(5, ge=1, description="delivery attempts before an effect has failed for good")
    alerts: AlertPolicy = AlertPolicy()

    @classmethod
    def load(cls, path: Path) -> "ConnectorPolicy":
        p = Path(path)
        if not p.exists():
            return cls()
        return cls.model_validate(yaml.safe_load(p.read_text(encoding="utf-8")) or {})


def breaker_key(connector: str) -> str:
    return f"connector:{connector}"
