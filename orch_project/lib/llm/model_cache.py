"""Loaded model files, kept warm per process (keyed by path): a flow's local task handler loads the
promoted model through ``load``, so every run in the process after the first reuses it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def load(kind: str, path: str, loader: Callable[[str], Any]) -> Any:
    key = (kind, str(path))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = loader(str(path))
        return _CACHE[key]


def clear() -> None:
    with _LOCK:
        _CACHE.clear()
