"""The flow definition: one ``FlowSpec`` per flow, plain data the platform derives everything from.

A flow is an ordered list of stages over per-item state in the app database. Each stage names the
status(es) it loads and the status it sets; from that one list come the stage chain, the open and
in-progress statuses, the dead-letter replay targets and the check that a stage's decisions are ones
its spec allows (``Stage.allowed_statuses``, enforced by ``pipeline.commit_stage``). The Dagster kit
(``orch_project/kit``) builds the assets, checks, sensors, jobs and schedules from the same spec.

This module is plain Python and names no flow: flows register themselves when their spec is built
(``register``), and shared layers (the outbox allow-list, the LLM gateway's task handlers, approvals)
look a flow up by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

# Where an item's journey ends: delivered, refused by a reviewer (or the approval timeout), or dead-lettered.
TERMINAL_STATUSES = ("resolved", "rejected", "dead_lettered")
# The status of an item a model step could not serve now (budget, open circuit): picked up by the next run.
DEFERRED = "deferred"
# The stage an item is "after" once a person's decision at an approval gate moved it on.
RESUMED_STAGE = "approval_decision"
# Names the kit uses for its own assets and steps: a flow's stages and ops stages cannot take them.
KIT_NAMES = frozenset({"intake", "escalation", "escalations", "dlq_backlog", "kpi_report", "raw_retention",
                       RESUMED_STAGE})
# Effects the platform itself causes for any flow (alerts on SLA breaches, overdue approvals, failed runs).
PLATFORM_EFFECTS = frozenset({("messaging", "send_alert")})

StageKind = Literal["plain", "model", "connector"]


@dataclass(frozen=True)
class Stage:
    """One step of a flow over a partition's items.

    ``fn(env, cfg, *resources)`` returns a ``pipeline.StageReport``; ``resources`` follow ``kind``:
    nothing for ``plain``, the flow's LLM gateway for ``model``, the connectors client for
    ``connector``. The stage selects items at ``loads`` (and, with ``after``, only those whose last
    completed stage is that one) and moves them to ``sets``, to one of ``branches`` (e.g. waiting for
    a person), to ``dead_lettered``, or -- for a model stage -- to ``deferred``."""

    name: str
    loads: str | tuple[str, ...]
    sets: str
    fn: Callable[..., Any]
    kind: StageKind = "plain"
    description: str = ""
    branches: tuple[str, ...] = ()
    after: str | None = None
    tasks: tuple[str, ...] = ()  # model tasks the stage calls: their prompts are part of its code version
    logic_version: str = "v1"  # bump when the stage's own logic changes what it decides
    deps: tuple[str, ...] = ()  # extra upstream assets (e.g. the served model)
    waits: bool = False  # may leave items where they are until an outside effect lands (outbox)
    asset: str | None = None  # the asset's name after the flow prefix (default: the stage name)
    # other statuses the stage may move items to besides ``sets`` (not waiting for a person): a flow whose
    # items are of several kinds sends each kind down its own part of the chain (a later stage loads each
    # route) or straight to a terminal status (e.g. a filtered post resolved at once)
    routes: tuple[str, ...] = ()

    @property
    def load_statuses(self) -> tuple[str, ...]:
        return (self.loads,) if isinstance(self.loads, str) else tuple(self.loads)

    @property
    def allowed_statuses(self) -> frozenset[str]:
        out = {self.sets, *self.routes, *self.branches, "dead_lettered"}
        if self.kind == "model":
            out.add(DEFERRED)
        if self.waits:
            out.update(self.load_statuses)
        return frozenset(out)


@dataclass(frozen=True)
class OpsStage:
    """A step across all partitions (fold-backs, redelivery, insights): ``fn(env, cfg, *resources)``
    returns a StageReport; it runs in the flow's ops job after every flow run and on its schedule."""

    name: str
    fn: Callable[..., Any]
    kind: StageKind = "plain"
    description: str = ""
    after: tuple[str, ...] = ()  # stages or ops stages (by name) whose assets it depends on
    # "weekly": an asset partitioned by ISO week (Monday to Sunday) in ``<flow>_weekly_job``, scheduled when a
    # week ends and backfillable; ``fn`` gets the week's seven days as ``env.days``. None: in the ops job.
    partitions: Literal["weekly"] | None = None


@dataclass(frozen=True)
class IntakeSpec:
    """Where a flow's items come from and how a raw record becomes one.

    ``to_item(raw, ctx)`` validates a parsed source record against the flow's contract and returns an
    ``intake.Accepted`` (``ctx``: an ``intake.IntakeContext`` with the salt and the vault) (or raises: pydantic's ValidationError / ValueError become dead
    letters with a reason that names fields, never values)."""

    to_item: Callable[..., Any]
    suffixes: tuple[str, ...] = (".json",)  # ("",): every file (the flow refuses what it cannot read)
    # parse_file(path) -> intake.Parsed, or a list of them for a file of many records (one per record,
    # source keys ``file:<name>#row=<n>``); default: lib.intake.parse_file
    parse_file: Callable[[Path], Any] | None = None
    # peek(path) -> intake.Parsed with the partition day only, for the intake sensor (default: parse_file);
    # a flow whose files are expensive to read (OCR) peeks at the file's arrival time instead
    peek: Callable[[Path], Any] | None = None
    description: str = ""
    text_fields: tuple[str, ...] = ("text",)  # masked ``data`` fields the no-unmasked-PII check scans
    asset: str = "intake"  # the intake asset's name after the flow prefix


@dataclass(frozen=True)
class ModelTask:
    """A model task of a flow: its output contract and, for the embedded provider, a factory
    ``local(db) -> LocalTask`` (``lib.llm.local``); tasks without one are answered by the flow's
    ``prompts/<task>.local.txt`` template."""

    output: type
    local: Callable[..., Any] | None = None
    label_choices: Callable[[], Sequence[str]] | None = None


@dataclass(frozen=True)
class GovernedModel:
    """A model a flow trains and serves under governance; the kit builds its assets (kit/governance.py):
    ``<asset>`` trains a candidate and registers it (registry keyed by ``task``), ``<asset>_evaluation``
    scores it on held-out data beside the version that serves now and decides the gate, the blocking
    check ``<asset>_gate`` stops ``<asset>_promotion`` when it fails (the serving version stays), and
    ``train_<asset>_job`` runs the three. ``orch model list|promote|rollback --task`` change the served
    version by hand.

    ``train(cfg, options, log) -> registry.Candidate`` (``options``: an instance of ``config``, a Dagster
    Config class the flow's folder defines, or None); ``evaluate(cfg, candidate, serving) -> dict`` with
    ``passed`` (bool), ``reason``, ``dataset`` and ``metrics`` of the candidate (and ``serving_metrics``
    on the same data), ``candidate``/``serving`` being registry rows (serving None when nothing serves)."""

    task: str
    asset: str
    train: Callable[..., Any]
    evaluate: Callable[..., dict]
    description: str = ""
    metric: str = "auc"  # the headline figure (UI metadata, `orch model list`)
    config: type | None = None
    kinds: frozenset[str] = frozenset({"scikitlearn"})


@dataclass(frozen=True)
class ReviewSpec:
    """What a reviewer sees of a waiting item (masked ``data`` fields) and how an edit lands:
    ``apply_edit(data, masked_text, reviewer_id, now_iso) -> (new data, the value replaced)``; it
    may raise ValueError for an edit it refuses (the reviewer sees the message)."""

    fields: tuple[str, ...] = ()
    apply_edit: Callable[..., tuple[dict[str, Any], Any]] | None = None
    edit_label: str = "text"
    # False: the edit reaches ``apply_edit`` as the reviewer wrote it and the hook masks what is
    # personal itself (an edit that is structured data, e.g. field corrections, not free text)
    mask_edit: bool = True
    # ``second_role(data) -> role | None``: an approval of this item also needs a second person with
    # that role (four eyes, e.g. above an amount); the first approval is recorded as a sign-off
    second_role: Callable[[dict[str, Any]], str | None] | None = None


def lazy(ref: str) -> Callable[..., Any]:
    """``"package.module:function"`` as a callable that imports the module on its first call: a flow's demo
    hooks live in its sample-data module, which loading the code location need not import."""
    module, _, name = ref.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


@dataclass(frozen=True)
class DemoSpec:
    """What ``orch demo`` does for a flow: ``seed(submit)`` drops the flow's shipped samples in its inbox
    (``submit(paths)`` returns counts); ``setup_jobs(db)`` names jobs to run first when needed (e.g.
    train a model none is promoted for); ``before_ops(settings, db)`` simulates the world between the
    flow run and the ops job (e.g. customers answering surveys) and returns a line to show;
    ``summary(settings)`` adds (label, value) lines to the flow's summary; ``weeks(settings, db)`` names the
    week partitions (their Mondays) of the flow's weekly ops stages the demo runs after each ops job. ``rounds``: how many times the
    demo runs sensor -> flow -> world -> ops (a flow whose ops stages write records back into its own intake,
    e.g. a weekly brief that requests assets, needs more than one); ``feeds``: flows this one hands records to
    (``lib.intake.hand_over``), which the demo runs after it so they pick those records up."""

    seed: Callable[[Callable[[list[Path]], dict]], dict]
    setup_jobs: Callable[[Any], list[str]] = lambda db: []
    before_ops: Callable[[Any, Any], str | None] | None = None
    summary: Callable[[Any], list[tuple[str, str]]] | None = None
    rounds: int = 1
    feeds: tuple[str, ...] = ()
    weeks: Callable[[Any, Any], list[str]] | None = None


@dataclass
class FlowSpec:
    """Everything the platform needs to run a flow. ``config`` is the flow's own configuration object
    (brief, roster, routing, prompts, policies); the kit passes it to every stage function."""

    name: str
    folder: Path
    title: str
    config: Any
    intake: IntakeSpec
    stages: Sequence[Stage]
    first_day: date = date(2026, 1, 1)
    ops: Sequence[OpsStage] = ()
    model_tasks: Mapping[str, ModelTask] = field(default_factory=dict)
    effects: frozenset[tuple[str, str]] = frozenset()
    systems: Sequence[Any] = ()  # connectors.embedded.System: the embedded systems this flow brings
    compensations: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    review: ReviewSpec = field(default_factory=ReviewSpec)
    sla_escalation: bool = True  # open items past due_at are escalated (ops asset <flow>_escalations)
    checks: Sequence[Any] = ()  # kit check specs (kit.checks): the flow's Great Expectations suites
    report: Callable[..., Any] | None = None  # report(db, spec, reports_dir) -> kpis.KpiReport (default: kpis)
    demo: DemoSpec | None = None  # how `orch demo` seeds and shows the flow
    ops_schedule: str = "*/15 * * * *"
    kinds: frozenset[str] = frozenset({"python", "sqlite"})
    models: Sequence[GovernedModel] = ()  # models the flow trains, gates and promotes (kit/governance.py)

    def __post_init__(self) -> None:
        self._validate()
        for comp in self.compensations.values():
            if tuple(comp) not in self.effects:
                raise ValueError(f"flow {self.name!r}: compensation {comp} is not among the flow's effects")
        if self.systems:
            from .connectors.embedded import register_system

            for system in self.systems:
                register_system(system)
        register(self)

    def _validate(self) -> None:
        """Refuse a spec the kit would build wrongly (each message says what to change)."""
        def fail(msg: str):
            raise ValueError(f"flow {self.name!r}: {msg}")

        names = [s.name for s in self.stages]
        ops = [o.name for o in self.ops]
        if len(set(names + ops)) != len(names) + len(ops):
            fail(f"stage and ops stage names must be unique: {names + ops}")
        if clash := sorted(set(names + ops) & KIT_NAMES):
            fail(f"{clash} are names the kit uses itself; rename the stage")
        produced = {"received"}
        for i, s in enumerate(self.stages):
            if not set(s.load_statuses) & produced:
                fail(f"stage {s.name!r} loads {s.load_statuses}, which no earlier stage sets")
            if s.after is not None and s.after not in ("intake", *names[:i]):
                fail(f"stage {s.name!r} is after {s.after!r}, which is not an earlier stage")
            produced |= {s.sets, *s.routes, *s.branches}
        loaded = {st for s in self.stages for st in s.load_statuses}
        gates = [s for s in self.stages if s.branches]
        if len(gates) > 1 or any(len(g.branches) > 1 for g in gates):
            fail("the kit runs one approval gate per flow with one waiting branch; "
                 f"found {[(g.name, g.branches) for g in gates]}")
        if gates and gates[0] is self.stages[-1]:
            fail(f"the approval gate {gates[0].name!r} needs a stage after it to take approved items")
        branches = {b for g in gates for b in g.branches}
        for s in self.stages:
            for st in (s.sets, *s.routes):
                if st not in loaded and st not in TERMINAL_STATUSES:
                    fail(f"stage {s.name!r} sets {st!r}, which no stage loads and is not terminal "
                         f"({', '.join(TERMINAL_STATUSES)}): items would be stuck there")
            if clash := set(s.routes) & set(s.branches):
                fail(f"stage {s.name!r}: {sorted(clash)} cannot be both a route and a waiting branch")
        for st in branches & loaded:
            fail(f"the waiting branch {st!r} is also loaded by a stage; a person decides it")
        known = {*names, *ops}
        for o in self.ops:
            if bad := [a for a in o.after if a not in known]:
                fail(f"ops stage {o.name!r} is after unknown stage(s) {bad}")
        for m in self.models:
            if m.task not in self.model_tasks:
                fail(f"governed model {m.asset!r} serves task {m.task!r}, which is not among the flow's model tasks")
        for c in self.checks:
            if getattr(c, "stage", None) not in names:
                fail(f"check {getattr(c, 'name', c)!r} is on unknown stage {getattr(c, 'stage', None)!r}")

    @property
    def gate(self) -> Stage | None:
        """The stage with a branch that waits for a person (the approval gate), if any."""
        return next((s for s in self.stages if s.branches), None)

    # -- derived from the one stage list ------------------------------------------------
    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stage chain, intake first."""
        return ("intake", *(s.name for s in self.stages))

    @cached_property
    def open_statuses(self) -> tuple[str, ...]:
        """Statuses of items still on their way (the flow or a person has work to do on them)."""
        seen: list[str] = ["received"]
        for s in self.stages:
            for st in (*s.load_statuses, s.sets, *s.routes, *s.branches, *((DEFERRED,) if s.kind == "model" else ())):
                if st not in seen and st not in TERMINAL_STATUSES:
                    seen.append(st)
        return tuple(seen)

    @cached_property
    def waiting_statuses(self) -> tuple[str, ...]:
        """Open statuses no stage loads: items waiting for a person (decided outside the flow)."""
        loaded = {st for s in self.stages for st in s.load_statuses} | {DEFERRED}
        return tuple(st for st in self.open_statuses if st not in loaded)

    @cached_property
    def in_progress_statuses(self) -> tuple[str, ...]:
        return tuple(st for st in self.open_statuses if st not in self.waiting_statuses)

    @cached_property
    def replay_targets(self) -> dict[str, tuple[str, str]]:
        """Failed stage -> (status it loads, the stage completed before it): where a replayed
        dead letter goes back to."""
        out: dict[str, tuple[str, str]] = {}
        previous = "intake"
        for s in self.stages:
            out[s.name] = (s.load_statuses[0], s.after or previous)
            previous = s.name
        return out

    @property
    def allowed_effects(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.effects) | PLATFORM_EFFECTS

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"flow {self.name!r} has no stage {name!r}; stages: {', '.join(self.stage_names)}")

    def inbox_dir(self, root: Path) -> Path:
        """The flow's own inbox folder under the inbox root (ORCH_INBOX_DIR)."""
        return Path(root) / self.name


class FlowConfig:
    """What every flow reads from its folder: ``brief.yaml`` (the design brief), ``roster.yaml`` (people
    and roles), ``routing.yaml`` (model routing), ``connectors.yaml`` (connector breakers, attempts,
    alert windows) and ``prompts/`` (versioned prompt files). Flows subclass it for their own files."""

    # the flow's own knobs: a pydantic model that validates brief.yaml ``settings`` (``cfg.settings``)
    settings_model: type | None = None

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @cached_property
    def settings(self) -> Any:
        """brief.yaml ``settings`` validated by the flow's ``settings_model`` (the mapping as written without one)."""
        raw = self.brief.settings
        return self.settings_model.model_validate(raw) if self.settings_model is not None else dict(raw)

    @cached_property
    def brief(self):
        from .contracts import DesignBrief

        return DesignBrief.load(self.folder / "brief.yaml")

    @cached_property
    def roster_file(self) -> dict[str, Any]:
        """roster.yaml as written (people, and whatever else a flow keeps there, e.g. teams)."""
        import yaml

        path = self.folder / "roster.yaml"
        return (yaml.safe_load(path.read_text()) if path.exists() else None) or {}

    @cached_property
    def roster(self) -> list[dict[str, Any]]:
        data = self.roster_file
        return list(data.get("people") or data.get("agents") or [])

    @cached_property
    def connector_policy(self):
        """Circuit breakers, timeout, attempts before compensation and alert windows (connectors.yaml)."""
        from .connectors.policy import ConnectorPolicy

        return ConnectorPolicy.load(self.folder / "connectors.yaml")

    @property
    def routing_path(self) -> Path:
        return self.folder / "routing.yaml"

    @property
    def prompts_dir(self) -> Path:
        return self.folder / "prompts"

    @cached_property
    def prompt_versions(self) -> dict[str, str]:
        """The prompt registry: prompts are versioned files, one id per prompt (``<task>`` and A/B
        variants ``<task>.<variant>``), the content hash of its OpenAI and embedded (``.local.txt``)
        files. Part of cache keys, evaluation records and the code versions of the assets that use them."""
        import hashlib

        out: dict[str, str] = {}
        for p in sorted(self.prompts_dir.glob("*.txt")):
            prompt_id = p.name.removesuffix(".txt").removesuffix(".local")
            out[prompt_id] = hashlib.sha256(out.get(prompt_id, "").encode() + p.read_bytes()).hexdigest()[:12]
        return out

    def code_version(self, tasks: Sequence[str], logic_version: str = "v1") -> str:
        """Code version of a model step: its logic version plus the version of every prompt its tasks
        can use (variants included). Editing a prompt file changes it, so Dagster marks the asset stale."""
        parts = [logic_version]
        for task in tasks:
            parts += [v for pid, v in sorted(self.prompt_versions.items()) if pid.split(".")[0] == task]
        return "-".join(parts)


_FLOWS: dict[str, FlowSpec] = {}


def register(spec: FlowSpec) -> None:
    """Make a flow known to the shared layers (a re-import of the same flow replaces it). Model task
    names are unique across flows: the model registry, caches and ledgers are keyed by task."""
    for other in _FLOWS.values():
        if other.name != spec.name and (shared := sorted(set(other.model_tasks) & set(spec.model_tasks))):
            raise ValueError(f"flow {spec.name!r}: model task(s) {shared} already belong to flow {other.name!r}; "
                             f"name them after the flow (e.g. {spec.name}_{shared[0]})")
    _FLOWS[spec.name] = spec


def unregister(name: str) -> None:
    """Forget a flow and the embedded systems it brought (tests that define throwaway flows)."""
    spec = _FLOWS.pop(name, None)
    if spec is not None and spec.systems:
        from .connectors.embedded import unregister_system

        for system in spec.systems:
            unregister_system(system.name)


def get(name: str) -> FlowSpec:
    if name not in _FLOWS:
        known = ", ".join(sorted(_FLOWS)) or "none loaded"
        raise KeyError(f"unknown flow {name!r} (flows: {known})")
    return _FLOWS[name]


def find(name: str) -> FlowSpec | None:
    return _FLOWS.get(name)


def governed_model(task: str) -> GovernedModel | None:
    """The governed model of any registered flow that serves ``task``."""
    return next((m for spec in _FLOWS.values() for m in spec.models if m.task == task), None)
