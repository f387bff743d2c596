"""Every external system as one ConfigurableResource. Defaults come from the environment
(orch_project.lib.settings); the embedded default needs no keys and no network."""


from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from ..lib.settings import Settings


class AppDatabase(dg.ConfigurableResource):
    """The app database (items, outbox, DLQ, approvals, audit, ledger). SQLite file by default;
    set ORCH_DATABASE_URL (e.g. postgresql+psycopg2://...) for production."""

    url: str | None = Field(default=None, description="SQLAlchemy URL; default from ORCH_DATABASE_URL / ORCH_HOME.")

    def database(self):
        from ..lib.store import Database

        return Database(self.url or Settings.from_env().database_url)


class Connectors(dg.ConfigurableResource):
    """CRM, ticketing and messaging. ``embedded`` keeps them as inspectable tables in their own
    database (ORCH_CONNECTORS_URL); real adapters plug in behind the same deliver() call."""

    kind: str = Field(default="embedded", description="embedded")
    url: str | None = Field(default=None, description="Database URL for the embedded connectors.")

    def client(self):
        if self.kind != "embedded":
            raise dg.Failure(f"connector kind {self.kind!r} is not available; use 'embedded'")
        return _embedded(self.url or Settings.from_env().connectors_url)


@lru_cache(maxsize=8)
def _embedded(url: str):
    from ..lib.connectors.embedded import EmbeddedConnectors

    return EmbeddedConnectors(url)


class Workspace(dg.ConfigurableResource):
    """Directories the flows read and write: inbox drop folder, reports, models, logs."""

    home: str | None = Field(default=None, description="Root for state; default ORCH_HOME or ./var.")

    def settings(self) -> Settings:
        return Settings.from_env(self.home).ensure_dirs()


class LLMGateway(dg.ConfigurableResource):
    """The single entry point to models. ``local`` (default) is the embedded offline provider:
    the promoted triage model from the registry, and retrieval-grounded templates for drafts."""

    provider: str = Field(default="local", description="Default provider (ORCH_LLM_PROVIDER): local")

    def gateway(self, db, *, flow: str, run_id: str | None, prompts_dir: Path, prompt_versions: dict[str, str]):
        from ..lib.llm.gateway import Candidate, Gateway, TaskPolicy
        from ..lib.llm.registry import promoted_model_path

        if self.provider != "local":
            raise dg.Failure(f"LLM provider {self.provider!r} is not available in this build; use 'local'")
        model_path, version = promoted_model_path(db, "triage")
        provider = _local_provider(str(model_path) if model_path else None, str(prompts_dir))
        policies: dict[str, Any] = {
            "triage": TaskPolicy([Candidate("local", f"triage-{version}")], prompt_versions.get("triage", "none")),
            "draft_reply": TaskPolicy([Candidate("local", "draft-template")], prompt_versions.get("draft_reply", "none")),
        }
        return Gateway(db, {"local": provider}, policies, flow=flow, run_id=run_id)


@lru_cache(maxsize=4)
def _local_provider(model_path: str | None, prompts_dir: str):
    from ..lib.llm.local import LocalProvider

    return LocalProvider.from_files(Path(model_path) if model_path else None, Path(prompts_dir))


def reset_process_caches(*, keep_models: bool = False) -> None:
    """Forget database engines and cached clients, for a process that switches ORCH_HOME or database
    URLs (tests, benchmarks). ``keep_models`` keeps the loaded triage model warm."""
    from ..lib.store import dispose_engines

    dispose_engines()
    _embedded.cache_clear()
    if not keep_models:
        _local_provider.cache_clear()


def default_resources() -> dict[str, Any]:
    import os

    return {
        "app_db": AppDatabase(),
        "connectors": Connectors(),
        "workspace": Workspace(),
        "llm": LLMGateway(provider=os.environ.get("ORCH_LLM_PROVIDER", "local")),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
