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
    """The single entry point to models. ``provider`` (ORCH_LLM_PROVIDER) picks the default:
    ``local`` is the embedded offline provider (each flow's registered task handlers, e.g. a promoted
    model from the registry, and its retrieval-grounded templates); ``openai`` is any OpenAI-compatible server through the
    official SDK, with the embedded provider as the last fallback. Routing, caches, budgets and the
    circuit breaker are configured per flow in its routing.yaml."""

    provider: str = Field(default="local", description="Default provider: local | openai (ORCH_LLM_PROVIDER)")
    openai_base_url: str | None = Field(default=None, description="OPENAI_BASE_URL; default: the SDK's")
    openai_api_key: str | None = Field(default=None, description="OPENAI_API_KEY (set through an EnvVar)")
    openai_models: str | None = Field(default=None, description="Per-task model names, 'triage=m1,draft_reply=m2' "
                                                                "(ORCH_OPENAI_MODELS)")
    concurrency: int | None = Field(default=None, description="Override routing.yaml's concurrency "
                                                              "(ORCH_LLM_CONCURRENCY)")

    def gateway(self, db, spec, *, run_id: str | None = None, routing_path: Path | None = None, budget=None):
        """The gateway for one flow's model steps (``spec``: its FlowSpec): its routing.yaml, prompts and
        budget, and an embedded provider with the flow's own task handlers (models load only for the
        flows whose tasks need them). ``routing_path`` / ``budget`` override the flow's (drills)."""
        from ..lib.llm.gateway import Gateway
        from ..lib.llm.local import LocalProvider
        from ..lib.llm.routing import RoutingConfig

        if self.provider not in ("local", "openai"):
            raise dg.Failure(f"ORCH_LLM_PROVIDER={self.provider!r} is not a provider; use 'local' or 'openai'")
        cfg = spec.config
        local = LocalProvider({task: t.local(db) for task, t in spec.model_tasks.items() if t.local is not None},
                              _templates(str(cfg.prompts_dir)))
        routing = RoutingConfig.load(routing_path or cfg.routing_path).for_provider(
            self.provider, openai_models=parse_models(self.openai_models), local_models=local.models)
        if self.concurrency:
            routing = routing.model_copy(update={"concurrency": self.concurrency})
        providers: dict[str, Any] = {"local": local}
        if self.provider == "openai":
            if not self.openai_api_key:
                raise dg.Failure("ORCH_LLM_PROVIDER=openai needs OPENAI_API_KEY (any value for a local "
                                 "OpenAI-compatible server) and usually OPENAI_BASE_URL")
            from ..lib.llm.openai_provider import OpenAIProvider

            providers["openai"] = OpenAIProvider(api_key=self.openai_api_key, base_url=self.openai_base_url,
                                                 max_retries=routing.max_retries, timeout_s=routing.timeout_s)
        prompts = {p.name.removesuffix(".txt"): p.read_text(encoding="utf-8")
                   for p in Path(cfg.prompts_dir).glob("*.txt") if not p.name.endswith(".local.txt")}
        return Gateway(db, providers, routing, flow=spec.name, run_id=run_id, default_provider=self.provider,
                       prompts=prompts, prompt_versions=cfg.prompt_versions, budget=budget or cfg.brief.budget)


def parse_models(spec: str | None) -> dict[str, str]:
    """'triage=gpt-4o-mini, draft_reply=gpt-4.1' -> {task: model}."""
    out = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        task, sep, model = part.partition("=")
        if not sep or not task.strip() or not model.strip():
            raise dg.Failure(f"ORCH_OPENAI_MODELS entry {part!r} is not task=model")
        out[task.strip()] = model.strip()
    return out


@lru_cache(maxsize=16)
def _templates(prompts_dir: str) -> dict[str, str]:
    from ..lib.llm.local import LocalProvider

    return LocalProvider.load_templates(Path(prompts_dir))


def reset_process_caches(*, keep_models: bool = False) -> None:
    """Forget database engines and cached clients, for a process that switches ORCH_HOME or database
    URLs (tests, benchmarks). ``keep_models`` keeps loaded models warm (``lib.llm.local`` handlers
    cache them by file)."""
    from ..lib.llm import model_cache
    from ..lib.store import dispose_engines

    dispose_engines()
    _embedded.cache_clear()
    _templates.cache_clear()
    from ..lib.llm.openai_provider import reset_clients

    reset_clients()
    if not keep_models:
        model_cache.clear()


def llm_from_env() -> LLMGateway:
    """The gateway as configured by the environment. Secrets and URLs are passed as dg.EnvVar so the
    UI and the event log show the variable's name, never its value."""
    import os

    kw: dict[str, Any] = {"provider": os.environ.get("ORCH_LLM_PROVIDER", "local").strip() or "local"}
    for field, var in (("openai_base_url", "OPENAI_BASE_URL"), ("openai_api_key", "OPENAI_API_KEY"),
                       ("openai_models", "ORCH_OPENAI_MODELS")):
        if os.environ.get(var):
            kw[field] = dg.EnvVar(var)
    if os.environ.get("ORCH_LLM_CONCURRENCY"):
        kw["concurrency"] = dg.EnvVar.int("ORCH_LLM_CONCURRENCY")
    return LLMGateway(**kw)


def default_resources() -> dict[str, Any]:
    return {
        "app_db": AppDatabase(),
        "connectors": Connectors(),
        "workspace": Workspace(),
        "llm": llm_from_env(),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
