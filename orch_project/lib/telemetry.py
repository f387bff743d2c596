"""Trace ids and structured logs. Log lines carry ids, counts and timings, never message text:
masking makes text safe for storage, but logs are copied too widely to hold even masked text."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

_LOGGER_NAME = "orch"


def new_trace_id() -> str:
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname, "event": record.getMessage()}
        doc.update(getattr(record, "fields", {}))
        return json.dumps(doc, default=str, sort_keys=True)


def get_logger(logs_dir: Path | None = None) -> logging.Logger:
    """The project logger; with ``logs_dir`` it appends JSON lines to logs_dir/orch.jsonl. One file
    handler at a time: a process that switches ORCH_HOME writes to the new home only."""
    logger = logging.getLogger(_LOGGER_NAME)
    if logs_dir is not None:
        path = str(Path(logs_dir) / "orch.jsonl")
        files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
        if not any(h.baseFilename == path for h in files):
            for h in files:
                logger.removeHandler(h)
                h.close()
            Path(logs_dir).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setFormatter(JsonFormatter())
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    return logger


def log_event(logger: logging.Logger, event: str, **fields: Any) -> None:
    logger.info(event, extra={"fields": fields})


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0
