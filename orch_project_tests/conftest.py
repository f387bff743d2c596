"""Shared fixtures: an isolated ORCH_HOME per test, a triage model trained once per session,
a Dagster test instance, the shipped sample corpus, the fake OpenAI server and temporary
PostgreSQL databases. Tests that need a public dataset (BANKING77, from ORCH_DATA_DIR) are skipped
with the reason where it is missing, and fail in CI (ORCH_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")

from orch_project.defs.support.sample_data import SAMPLES_DIR  # noqa: E402

SAMPLE_TABLE = SAMPLES_DIR / "inbox_table.jsonl"
MALFORMED = SAMPLES_DIR / "malformed"
OPENAI_TEST_KEY = "sk-test-do-not-leak-4242"
PG_HOST = os.environ.get("ORCH_TEST_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("ORCH_TEST_PG_USER", "postgres")


def require_services() -> bool:
    return os.environ.get("ORCH_REQUIRE_SERVICES") == "1"


def dataset_missing(exc: Exception):
    """Skip the test with the DatasetMissing message; fail it in CI (ORCH_REQUIRE_SERVICES=1)."""
    if require_services():
        pytest.fail(f"{exc} (public datasets are required in CI: ORCH_REQUIRE_SERVICES=1)")
    pytest.skip(str(exc))


def require_dataset(name: str) -> Path:
    """The folder of public dataset ``name`` in the data directory, or skip/fail (``dataset_missing``)."""
    from orch_project.lib import datasets

    try:
        return datasets.dataset_dir(name)
    except datasets.DatasetMissing as exc:
        dataset_missing(exc)


def banking77(split: str = "train") -> tuple[list[str], list[str]]:
    """BANKING77 texts and intents of ``split`` (lib.datasets), or skip/fail (``dataset_missing``)."""
    from orch_project.lib import datasets

    try:
        return datasets.read_banking77(split)
    except datasets.DatasetMissing as exc:
        dataset_missing(exc)


def banking77_csv(split: str = "train") -> Path:
    """The path of BANKING77's ``train.csv`` / ``test.csv``, or skip/fail (``dataset_missing``)."""
    from orch_project.lib import datasets

    try:
        return datasets.banking77_csv(split)
    except datasets.DatasetMissing as exc:
        dataset_missing(exc)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """Train the triage model on BANKING77 once per session (about 40 s) and reuse the file everywhere."""
    from orch_project.lib.llm import triage_model as tm

    texts, labels = banking77("train")
    model = tm.train(texts, labels)
    path = model.save(tmp_path_factory.mktemp("models"))
    return {"path": path, "version": model.version, "metrics": model.metrics}


@pytest.fixture(scope="session")
def lead_model(tmp_path_factory):
    """The leads flow's scorer trained once per session on the seeded history (a few seconds), as the
    ``lead_score_model`` asset trains it; tests register and promote it in their own database."""
    from orch_project.defs.leads import logic, model as lm

    home = tmp_path_factory.mktemp("lead_model_home")
    old = os.environ.get("ORCH_HOME")
    os.environ["ORCH_HOME"] = str(home)
    try:
        cand = lm.train_candidate(logic.CFG, lm.LeadScoreTrainingConfig(search_budget_s=0))
    finally:
        if old is None:
            os.environ.pop("ORCH_HOME", None)
        else:
            os.environ["ORCH_HOME"] = old
    return cand


@pytest.fixture
def with_lead_model(db, lead_model):
    """The session's lead scorer registered and promoted in this test's app database."""
    from orch_project.lib.llm import registry

    c = lead_model
    registry.register(db, task="lead_score", version=c.version, path=c.path, train_data_hash=c.train_data_hash,
                      code_version=c.code_version, metrics=c.metrics)
    registry.promote(db, c.version, actor="test", reason="fixture")
    return c


@pytest.fixture
def orch_home(tmp_path, monkeypatch):
    """An empty ORCH_HOME with its own app and connector databases, DAGSTER_HOME and inbox."""
    home = tmp_path / "orch"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{home / 'app.sqlite'}")
    monkeypatch.setenv("ORCH_CONNECTORS_URL", f"sqlite:///{home / 'connectors.sqlite'}")
    monkeypatch.setenv("ORCH_INBOX_DIR", str(home / "inbox"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    from orch_project.defs.resources import reset_process_caches
    from orch_project.lib.settings import Settings

    reset_process_caches()
    yield Settings.from_env().ensure_dirs()
    reset_process_caches()


@pytest.fixture
def db(orch_home):
    from orch_project.lib.store import Database

    return Database(orch_home.database_url)


def register_promoted(db, model: dict) -> None:
    """Register a trained model and promote it (what triage_model_promotion does after the gate)."""
    from orch_project.lib.llm import registry

    registry.register(db, task="triage", version=model["version"], path=model["path"],
                      train_data_hash=model["metrics"]["train_data_hash"],
                      code_version=model["metrics"]["code_version"], metrics=model["metrics"])
    registry.promote(db, model["version"], actor="test", reason="fixture")


@pytest.fixture
def with_model(db, trained_model):
    """The session's trained model registered and promoted in this test's app database."""
    register_promoted(db, trained_model)
    return trained_model


@pytest.fixture
def instance():
    import dagster as dg

    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def fake_openai():
    """A fake OpenAI-compatible server (fake_openai.FakeOpenAI, seed 3) for this test."""
    from .fake_openai import FakeOpenAI

    with FakeOpenAI(seed=3) as srv:
        yield srv


@pytest.fixture
def openai_env(orch_home, fake_openai, monkeypatch):
    """Definitions loaded with the environment a user sets for an OpenAI-compatible server (the
    fake one, key OPENAI_TEST_KEY)."""
    from orch_project.definitions import build_defs

    monkeypatch.setenv("ORCH_LLM_PROVIDER", "openai")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_TEST_KEY)
    return build_defs()


def pg_admin():
    """An autocommit connection to the ``postgres`` database of the test server (PG_HOST:5432)."""
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=5432, user=PG_USER, dbname="postgres", connect_timeout=3)
    conn.autocommit = True
    return conn


def postgres_url(name: str) -> str:
    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{name}"


@pytest.fixture
def pg_database():
    """A factory: ``pg_database(prefix)`` creates a temporary database on the test PostgreSQL server and
    returns its name; every database created is dropped at teardown. Skipped with a message where no
    server runs; a failure in CI (ORCH_REQUIRE_SERVICES=1)."""
    try:
        admin = pg_admin()
    except Exception as exc:
        if require_services():
            pytest.fail(f"PostgreSQL on {PG_HOST}:5432 is required in CI but unreachable: {exc}")
        pytest.skip(f"PostgreSQL on {PG_HOST}:5432 not reachable ({exc}); start it to run production-path tests")
    created: list[str] = []

    def create(prefix: str = "orch_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return name

    yield create
    from orch_project.lib.store import dispose_engines

    dispose_engines()
    try:
        with admin.cursor() as cur:
            for name in created:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (created,))
            left = cur.fetchall()
    finally:
        admin.close()
    assert not left, f"temporary databases not dropped: {left}"


@pytest.fixture(scope="session")
def defs():
    from orch_project.definitions import defs as d

    return d


def sample_messages(day: str | None = None) -> list[dict]:
    msgs = [json.loads(line) for line in SAMPLE_TABLE.read_text().splitlines() if line.strip()]
    return [m for m in msgs if day is None or m["received_at"].startswith(day)]


QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def run_flow(defs, instance, day: str, flow: str = "support"):
    """One partition of ``flow``'s flow job, in process."""
    return defs.resolve_job_def(f"{flow}_flow_job").execute_in_process(
        instance=instance, partition_key=day, run_config=QUIET, raise_on_error=False)


def run_ops(defs, instance, flow: str = "support"):
    return defs.resolve_job_def(f"{flow}_ops_job").execute_in_process(instance=instance, run_config=QUIET,
                                                                     raise_on_error=False)


def flow_inbox(settings, flow: str = "support") -> Path:
    """A flow's own inbox folder under ORCH_INBOX_DIR (``<inbox>/<flow>``)."""
    from orch_project.kit.registry import discover

    return discover()[flow].inbox_dir(settings.inbox_dir)


def support_inbox(settings) -> Path:
    return flow_inbox(settings, "support")


def write_file(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(data)
    return p
