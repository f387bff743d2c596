"""Alerts from a flow's design brief (``error_rate>2%``, ``latency_p95>90s``, ``dlq_backlog>50``) and
from failed runs.

``observe`` measures the rules' metrics with a few cheap queries (no pandas); ``raise_alert`` records a
breach once per de-duplication key in the ``alerts`` table (the same breach raises once per window,
a failed run once), sends it through the messaging connector via the outbox (``messaging`` /
``send_alert``, idempotency key per alert), writes a structured log line and, when configured by the
environment, posts it to a Slack incoming webhook (``ORCH_ALERT_SLACK_WEBHOOK``) and mails it over SMTP
(``ORCH_ALERT_SMTP_HOST`` / ``_PORT`` / ``_FROM`` / ``_TO``). Standard library only. Alert text holds
ids, counts and thresholds, never message text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from .connectors.embedded import Effect
from .contracts import AlertRule
from .outbox import dispatch, enqueue
from .store import Database, alerts, as_utc, dlq, intake, items, utcnow
from .telemetry import log_event

LATENCY_SAMPLE = 5000  # most recent resolved items the p95 is computed over


def observe(db: Database, flow: str) -> dict[str, float | None]:
    """The brief's alert metrics, as KPI report computes them: error rate = dead-lettered / finished
    (resolved + dead-lettered, intake included), p95 processing latency of resolved items in seconds
    (the most recent ``LATENCY_SAMPLE``), open dead letters."""
    with db.begin() as conn:
        by_status = dict(conn.execute(sa.select(items.c.status, sa.func.count()).where(
            items.c.flow == flow, items.c.status.in_(("resolved", "dead_lettered"))).group_by(items.c.status)).all())
        intake_dead = conn.execute(sa.select(sa.func.count()).select_from(intake).where(
            intake.c.flow == flow, intake.c.outcome == "dead_lettered")).scalar_one()
        dlq_open = conn.execute(sa.select(sa.func.count()).select_from(dlq).where(
            dlq.c.flow == flow, dlq.c.status == "open")).scalar_one()
        lat = conn.execute(sa.select(items.c.ingested_at, items.c.resolved_at).where(
            items.c.flow == flow, items.c.status == "resolved", items.c.resolved_at.is_not(None))
            .order_by(items.c.resolved_at.desc()).limit(LATENCY_SAMPLE)).all()
    resolved = int(by_status.get("resolved", 0))
    dead = int(by_status.get("dead_lettered", 0)) + int(intake_dead)
    secs = sorted((as_utc(r) - as_utc(i)).total_seconds() for i, r in lat)
    p95 = None
    if secs:  # linear interpolation, as pandas' quantile
        pos = 0.95 * (len(secs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(secs) - 1)
        p95 = secs[lo] + (secs[hi] - secs[lo]) * (pos - lo)
    return {"error_rate": dead / (resolved + dead) if resolved + dead else None, "latency_p95": p95,
            "dlq_backlog": float(dlq_open)}


def breaches(rules: list[AlertRule], observed: dict[str, float | None]) -> list[dict[str, Any]]:
    return [{"rule": r.raw, "metric": r.metric, "observed": observed.get(r.metric), "threshold": r.threshold}
            for r in rules if r.breached(observed.get(r.metric))]


@dataclass
class Notifier:
    """Real-world delivery of alerts, configured by the environment (all optional)."""

    slack_webhook: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "orch-alerts@localhost"
    smtp_to: list[str] = field(default_factory=list)
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> "Notifier":
        e = os.environ
        return cls(slack_webhook=e.get("ORCH_ALERT_SLACK_WEBHOOK") or None,
                   smtp_host=e.get("ORCH_ALERT_SMTP_HOST") or None,
                   smtp_port=int(e.get("ORCH_ALERT_SMTP_PORT") or 25),
                   smtp_from=e.get("ORCH_ALERT_SMTP_FROM") or "orch-alerts@localhost",
                   smtp_to=[a.strip() for a in (e.get("ORCH_ALERT_SMTP_TO") or "").split(",") if a.strip()])

    def send(self, subject: str, text: str) -> dict[str, str]:
        """Deliver to every configured channel; returns {channel: "delivered" | error}. Never raises."""
        out: dict[str, str] = {}
        if self.slack_webhook:
            out["slack"] = self._guard(self._slack, subject, text)
        if self.smtp_host and self.smtp_to:
            out["smtp"] = self._guard(self._smtp, subject, text)
        return out

    @staticmethod
    def _guard(fn, subject: str, text: str) -> str:
        try:
            fn(subject, text)
            return "delivered"
        except Exception as exc:  # an alert channel being down must not hide the alert elsewhere
            return f"{type(exc).__name__}: {exc}"[:255]

    def _slack(self, subject: str, text: str) -> None:
        import urllib.request

        body = json.dumps({"text": f"*{subject}*\n{text}"}).encode("utf-8")
        req = urllib.request.Request(self.slack_webhook, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"Slack webhook answered HTTP {resp.status}")

    def _smtp(self, subject: str, text: str) -> None:
        import smtplib
        from email.message import EmailMessage

        msg = EmailMessage()
        msg["Subject"], msg["From"], msg["To"] = subject, self.smtp_from, ", ".join(self.smtp_to)
        msg.set_content(text)
        with smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout_s) as smtp:
            smtp.send_message(msg)


def window_start(now: datetime, window_s: float) -> datetime:
    epoch = now.timestamp()
    return datetime.fromtimestamp(epoch - epoch % window_s, tz=timezone.utc)


def raise_alert(db: Database, connectors: Any, flow: str, *, rule: str, metric: str, observed: float | None,
                threshold: float | None, source: str, dedup_key: str, message: str, policy: Any = None,
                notifier: Notifier | None = None, logger: logging.Logger | None = None,
                now: datetime | None = None, window: datetime | None = None) -> dict[str, Any] | None:
    """Record and send one alert unless ``dedup_key`` was raised already; returns the alert or None."""
    now = now or utcnow()
    dedup_key = dedup_key[:255]
    row = {"flow": flow, "dedup_key": dedup_key, "rule": rule[:128], "metric": metric[:64], "observed": observed,
           "threshold": threshold, "source": source[:128], "window_start": window or now, "message": message,
           "channels": {}, "created_at": now}
    try:
        with db.write() as conn:
            if conn.execute(sa.select(alerts.c.id).where(alerts.c.dedup_key == dedup_key)).first() is not None:
                return None
            row["id"] = conn.execute(alerts.insert().values(**row)).inserted_primary_key[0]
    except IntegrityError:  # another process raised the same alert first
        return None
    digest = hashlib.sha256(dedup_key.encode()).hexdigest()
    subject = f"[orch] {flow}: {rule}"
    key = f"{flow}:alert:{digest[:24]}"
    effect = Effect(key, "messaging", "send_alert", f"alert:{digest[:24]}", digest[:32],
                    {"kind": "alert", "recipient": f"channel:alerts:{flow}", "subject": subject, "body": message})
    with db.begin() as conn:
        enqueue(db, conn, flow, [effect])
    sent = dispatch(db, connectors, flow, keys=[key], policy=policy) if connectors is not None else {"delivered": 0}
    channels = {"messaging": "delivered" if sent["delivered"] else "pending (outbox)"}
    channels.update((notifier or Notifier.from_env()).send(subject, message))
    with db.begin() as conn:
        conn.execute(alerts.update().where(alerts.c.id == row["id"]).values(channels=channels))
    row["channels"] = channels
    log_event(logger or logging.getLogger("orch"), "alert_raised", flow=flow, rule=rule, metric=metric,
              observed=observed, threshold=threshold, source=source, dedup_key=dedup_key, channels=channels)
    return row


def check_rules(db: Database, connectors: Any, flow: str, rules: list[AlertRule], *, source: str,
                window_s: float = 3600.0, policy: Any = None, notifier: Notifier | None = None,
                logger: logging.Logger | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Evaluate the brief's rules and raise each breach once per window."""
    now = now or utcnow()
    observed = observe(db, flow)
    found = breaches(rules, observed)
    start = window_start(now, window_s)
    raised = []
    for b in found:
        shown = "n/a" if b["observed"] is None else f"{b['observed']:.4g}"
        msg = (f"Alert rule {b['rule']} breached for flow {flow}: {b['metric']} = {shown} "
               f"(threshold {b['threshold']:.4g}). Window from {start.isoformat()} ({window_s:g} s). Source: {source}.")
        a = raise_alert(db, connectors, flow, rule=b["rule"], metric=b["metric"], observed=b["observed"],
                        threshold=b["threshold"], source=source, dedup_key=f"{flow}:{b['rule']}:{start.isoformat()}",
                        message=msg, policy=policy, notifier=notifier, logger=logger, now=now, window=start)
        if a is not None:
            raised.append(a)
    return {"observed": observed, "breached": found, "raised": raised, "window_start": start}
