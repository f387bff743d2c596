"""Where things live, read from the environment (every variable is listed in README.md).

Nothing here touches the network or imports a heavy library: the code location imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = PACKAGE_DIR.parent
# Public datasets (BANKING77 ...) are not in the package: orch_project.lib.datasets finds them
# ($ORCH_DATA_DIR, default ../shared/data beside the checkout).


def _default_home() -> Path:
    # A source checkout keeps its state in ./var next to pyproject.toml (git-ignored);
    # an installed package keeps it in the user's home.
    if (REPO_DIR / "pyproject.toml").exists():
        return REPO_DIR / "var"
    return Path.home() / ".orch_project"


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    connectors_url: str
    inbox_dir: Path
    reports_dir: Path
    models_dir: Path
    logs_dir: Path
    llm_provider: str
    pii_salt: str

    @classmethod
    def from_env(cls, home: str | Path | None = None) -> "Settings":
        home = Path(home or os.environ.get("ORCH_HOME") or _default_home()).expanduser().resolve()
        return cls(
            home=home,
            database_url=os.environ.get("ORCH_DATABASE_URL") or f"sqlite:///{home / 'app.sqlite'}",
            connectors_url=os.environ.get("ORCH_CONNECTORS_URL") or f"sqlite:///{home / 'connectors.sqlite'}",
            inbox_dir=Path(os.environ.get("ORCH_INBOX_DIR") or home / "inbox"),
            reports_dir=Path(os.environ.get("ORCH_REPORTS_DIR") or home / "reports"),
            models_dir=Path(os.environ.get("ORCH_MODELS_DIR") or home / "models"),
            logs_dir=Path(os.environ.get("ORCH_LOGS_DIR") or home / "logs"),
            llm_provider=os.environ.get("ORCH_LLM_PROVIDER", "local"),
            # The salt keys customer references (hashed e-mail addresses). Set it per deployment.
            pii_salt=os.environ.get("ORCH_PII_SALT", "orch-project-default-salt"),
        )

    def ensure_dirs(self) -> "Settings":
        for d in (self.home, self.inbox_dir, self.reports_dir, self.models_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self
