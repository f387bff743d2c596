"""The code location: every definition under orch_project/defs, found by Dagster's loader."""

from pathlib import Path

import dagster as dg


def build_defs() -> dg.Definitions:
    """Load the definitions; resources read the environment at this moment (ORCH_*, OPENAI_*)."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


defs = build_defs()
