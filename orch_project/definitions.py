"""The orch_project code location: every Dagster object under orch_project/defs, loaded by folder."""

import dagster as dg

from orch_project import defs as _defs_root

defs = dg.load_defs(defs_root=_defs_root)
