"""Every flow of the project: each folder ``orch_project/defs/<flow>/`` with a ``flow.py`` that defines
``SPEC``. Importing it registers the flow (``lib.flows``); the CLI and the demo discover flows here."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..lib import flows

DEFS_DIR = Path(__file__).resolve().parents[1] / "defs"


def discover() -> dict[str, flows.FlowSpec]:
    """The project's flows by name, in folder order."""
    out = {}
    for folder in sorted(p for p in DEFS_DIR.iterdir() if (p / "flow.py").is_file()):
        module = importlib.import_module(f"orch_project.defs.{folder.name}.flow")
        out[module.SPEC.name] = module.SPEC
    return out


def resolve(name: str | None) -> flows.FlowSpec:
    """The flow called ``name``; with no name, the only flow there is (an error lists them otherwise)."""
    found = discover()
    if name is None:
        if len(found) == 1:
            return next(iter(found.values()))
        raise KeyError(f"several flows exist ({', '.join(found)}): choose one with --flow")
    if name not in found:
        raise KeyError(f"no flow {name!r}; flows: {', '.join(found) or 'none'} (see `orch flows`)")
    return found[name]
