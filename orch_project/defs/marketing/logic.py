"""The marketing program as plain functions, one per stage; flow.py orders them and the kit builds their Dagster
assets. This module is the listening half (intake to the hand-off of complaints) and the program's
configuration; program.py the acting half (idea brief, copy, review, calendar, publishing, performance,
budget re-allocation and nurture segments).

The flow's items are of three kinds, each down its own part of one stage chain:

- a social **post** (JSON lines feeds in the inbox folder, or inbox-table rows): intake (contract-validated,
  the author's handle to the vault, other people's handles and PII masked) -> screen (language, spam and bot
  filters: a filtered post is resolved at once with its reason) -> sentiment (model task
  ``marketing_sentiment`` through the gateway) -> topics (the brief's themes by keyword, else a keyphrase
  whose canonical slug is the topic id, so ids are stable across partitions; urgency: complaint / outage) ->
  handoff (an urgent post becomes a support intake event, exactly once per post, through the platform);
- an **asset request** (one per channel of a week's idea brief, written by the ``idea_brief`` ops stage):
  screen -> compose -> brand_check -> review_gate (a person approves every asset) -> schedule -> publish;
- a budget **allocation** (the next period's split, written by the ``reallocate`` ops stage): screen ->
  review_gate (a shift above the brief's threshold waits for a person) -> schedule -> publish (set budgets).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...lib.connectors.embedded import Delivery, System, base_row, cmeta, system_table, void_by_effect_key
from ...lib.contracts import LLMOutput, LLMStepRequest, aware_utc, describe_validation_error, refuse_nul
from ...lib.flows import FlowConfig
from ...lib.guardrails import pii
from ...lib.intake import Accepted, IntakeContext, Parsed, Rejected, hand_over, parse_records_file, vault_values
from ...lib.pipeline import (ItemUpdate, StageEnv, StageReport, commit_stage, load_stage_items,
                             model_step_failed, without_deferred)
from ...lib.store import utcnow

FLOW = "marketing"
FOLDER = Path(__file__).parent
FIRST_DAY = date(2026, 1, 1)
SENTIMENT_TASK = "marketing_sentiment"
BRIEF_TASK = "marketing_brief"
COPY_TASK = "marketing_copy"
STEP_LOGIC_VERSION = {"sentiment": "sentiment-v1", "compose": "compose-v1"}
KINDS = ("post", "asset_request", "allocation")
CHANNEL_KINDS = ("email", "social", "ad")


# --- configuration ---------------------------------------------------------------------------------------

class Theme(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z][a-z0-9_-]{1,40}$")
    name: str
    keywords: list[str] = Field(min_length=1)


class ChannelRules(BaseModel):
    """One publishing channel: its kind (what copy it takes), length limits, calendar and disclaimer."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["email", "social", "ad"]
    max_chars: dict[str, int] = Field(default_factory=dict)  # field -> maximum length
    required: list[str] = Field(default_factory=list)        # sentences every variant must carry
    per_day: int = Field(1, ge=1, le=48)                       # rate limit: publications a day
    min_gap_hours: float = Field(4, ge=0)


class MarketingSettings(BaseModel):
    """The program's own knobs (brief.yaml ``settings``)."""

    model_config = ConfigDict(extra="forbid")
    brand: str = "Northwind Bank"
    brand_handles: list[str] = Field(default_factory=lambda: ["@northwindbank"])
    competitors: list[str] = Field(default_factory=list)  # brands whose mentions count in share of voice
    languages: list[str] = Field(default_factory=lambda: ["en"])
    themes: list[Theme] = Field(default_factory=list)
    spam_phrases: list[str] = Field(default_factory=list)
    max_links: int = Field(2, ge=0)
    max_hashtags: int = Field(6, ge=1)
    bot_signals_needed: int = Field(2, ge=1)
    complaint_cues: list[str] = Field(default_factory=list)
    outage_cues: list[str] = Field(default_factory=list)
    complaints_to: str = "support"              # the flow complaints and outage reports are handed to
    channels: dict[str, ChannelRules] = Field(default_factory=dict)
    banned_claims: list[str] = Field(default_factory=list)
    quiet_hours: tuple[int, int] = (21, 8)      # no publishing from 21:00 to 08:00 (brand time zone)
    timezone: str = "Europe/London"
    top_topics: int = Field(3, ge=1, le=10)
    weekly_budget: float = Field(7000, gt=0)
    min_share: float = Field(0.1, ge=0, lt=1)
    max_shift: float = Field(0.15, gt=0, le=1)
    approval_shift: float = Field(0.08, ge=0, le=1)  # a channel moved by more than this share waits for a person
    nurture_to: str = "leads"                         # the flow that runs nurture sequences

    @model_validator(mode="after")
    def _consistent(self) -> "MarketingSettings":
        if len(self.channels) * self.min_share >= 1:
            raise ValueError(f"min_share {self.min_share} x {len(self.channels)} channels leaves nothing to move")
        lo, hi = self.quiet_hours
        if not (0 <= lo < 24 and 0 <= hi < 24) or lo == hi:
            raise ValueError("quiet_hours are [start, end) hours of the day, e.g. [21, 8]")
        return self


class MarketingConfig(FlowConfig):
    settings_model = MarketingSettings


CFG = MarketingConfig(FOLDER)


# --- contracts -------------------------------------------------------------------------------------------

class PostMetrics(BaseModel):
    """What a platform reports with a post (all optional; unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore")
    likes: int = Field(0, ge=0)
    reposts: int = Field(0, ge=0)
    replies: int = Field(0, ge=0)
    author_followers: int | None = Field(None, ge=0)
    author_following: int | None = Field(None, ge=0)
    author_posts_24h: int | None = Field(None, ge=0)
    author_account_age_days: int | None = Field(None, ge=0)


class SocialPost(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    id: str = Field(min_length=1, max_length=128)
    platform: str = Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_.-]*$")
    author: str = Field(min_length=2, max_length=64, description="the author's handle, e.g. @jane")
    text: str = Field(min_length=1, max_length=5000)
    created_at: datetime
    lang: str | None = Field(None, max_length=8, description="the platform's language tag, when it gives one")
    metrics: PostMetrics = Field(default_factory=PostMetrics)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return aware_utc(v)

    @field_validator("text")
    @classmethod
    def _no_nul(cls, v: str) -> str:
        return refuse_nul(v, "text")


class AssetRequest(BaseModel):
    """One channel's copy for a week's idea brief (written by the idea_brief ops stage)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["asset_request"]
    id: str
    week: str = Field(pattern=r"^\d{4}-W\d{2}$")
    channel: str
    brief: dict[str, Any]


class AllocationProposal(BaseModel):
    """The next period's budget per channel (written by the reallocate ops stage)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["allocation"]
    id: str
    period: str = Field(pattern=r"^\d{4}-W\d{2}$")
    budget: float = Field(gt=0)
    allocation: dict[str, float]
    previous: dict[str, float]
    expected_conversions: float
    reasons: dict[str, str]
    detail: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sums(self) -> "AllocationProposal":
        if abs(sum(self.allocation.values()) - self.budget) > 0.05 or min(self.allocation.values(), default=0) < 0:
            raise ValueError("allocation: amounts must be non-negative and sum to the budget")
        return self


# --- intake ------------------------------------------------------------------------------------------------

def parse_file(path: Path) -> Parsed | list[Parsed]:
    """A feed file: ``.jsonl`` is one post per line (a broken line is dead-lettered with its line number and
    the rest go on), ``.json`` one record."""
    return parse_records_file(path, "post")


MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{2,30}\b")


def _mask_post(text: str, author: str, brand_handles: list[str]) -> tuple[str, Counter]:
    """The post with personal data masked: PII by the platform's detectors and every @handle that is not the
    brand's own (people named in a post are people)."""
    own = {h.casefold() for h in brand_handles}
    counts: Counter = Counter()

    def handle(m: re.Match) -> str:
        if m.group(0).casefold() in own:
            return m.group(0)
        counts["HANDLE"] += 1
        return "<HANDLE>"

    text = MENTION.sub(handle, text)
    m = pii.mask(text, [author.lstrip("@")])
    return m.text, counts + m.counts


def to_item(raw: dict[str, Any], ctx: IntakeContext) -> Accepted:
    """One record as an item: a post (contract-validated, the author's handle only in the vault and as a salted
    reference, the text masked), or one of the program's own records (asset request, allocation)."""
    kind = raw.get("kind", "post")
    row = raw.get("_row")
    where = f"line {row}: " if row is not None else ""
    try:
        if kind == "asset_request":
            req = AssetRequest.model_validate(raw)
            if req.channel not in CFG.settings.channels:
                raise Rejected("validation", f"channel {req.channel!r} is not one of the brief's channels "
                                             f"({', '.join(CFG.settings.channels)})")
            return Accepted(item_id=f"asset-{req.id.replace(':', '-')}", channel=req.channel,
                            data={"kind": "asset_request", "week": req.week, "channel": req.channel,
                                  "channel_kind": CFG.settings.channels[req.channel].kind, "brief": req.brief})
        if kind == "allocation":
            prop = AllocationProposal.model_validate(raw)
            if unknown := sorted(set(prop.allocation) - set(CFG.settings.channels)):
                raise Rejected("validation", f"allocation: unknown channel(s) {unknown}")
            return Accepted(item_id=f"alloc-{prop.period}", data={"kind": "allocation", **prop.model_dump(
                exclude={"kind", "id"})})
        if kind != "post":
            raise Rejected("unsupported", f"{where}kind {str(kind)[:30]!r} is not one the program takes "
                                          f"({', '.join(KINDS)})")
        post = SocialPost.model_validate({k: v for k, v in raw.items() if k != "_row"})
    except ValidationError as exc:
        raise Rejected("validation", where + describe_validation_error(exc)) from None
    item_id = "post-" + hashlib.sha256(f"{post.platform}:{post.id}".encode()).hexdigest()[:16]
    text, counts = _mask_post(post.text, post.author, CFG.settings.brand_handles)
    token = ctx.vault(item_id, "HANDLE", post.author)
    return Accepted(item_id=item_id, received_at=post.created_at, channel=post.platform, pii=counts, data={
        "kind": "post", "post_id": post.id, "platform": post.platform, "text": text, "lang_tag": post.lang,
        "author_ref": pii.customer_ref(f"{post.platform}:{post.author}", ctx.salt), "author_token": token,
        "handle_digits": len(re.search(r"\d*$", post.author).group(0)), "metrics": post.metrics.model_dump()})


# --- screen: language, spam and bots ----------------------------------------------------------------------

URL = re.compile(r"https?://\S+|www\.\S+", re.I)
HASHTAG = re.compile(r"#\w+")


@lru_cache(maxsize=1)
def _langid():
    import py3langid

    return py3langid


def language(text: str, tag: str | None) -> str:
    """The post's language: the platform's tag when it gives one, else identified from the text (py3langid, its
    model inside the wheel); text without letters (links, emoji) counts as undetermined ``und``."""
    if tag:
        return tag.split("-")[0].lower()
    words = re.sub(r"<[A-Z_]+>|" + URL.pattern + r"|[@#]\w+", " ", text)
    if len(re.findall(r"[^\W\d_]{2,}", words)) < 2:
        return "und"
    return str(_langid().classify(words)[0])


def spam_reasons(text: str, s: MarketingSettings) -> list[str]:
    low = text.casefold()
    out = [f"spam phrase {p!r}" for p in s.spam_phrases if p.casefold() in low]
    if len(URL.findall(text)) > s.max_links:
        out.append(f"{len(URL.findall(text))} links (more than {s.max_links})")
    if len(HASHTAG.findall(text)) > s.max_hashtags:
        out.append(f"{len(HASHTAG.findall(text))} hashtags (more than {s.max_hashtags})")
    return out


def bot_signals(d: dict[str, Any]) -> list[str]:
    """Signals that an account is automated, from what the platform reports about the author."""
    m = d.get("metrics") or {}
    out = []
    if (m.get("author_posts_24h") or 0) >= 100:
        out.append(f"{m['author_posts_24h']} posts in 24 h")
    if m.get("author_account_age_days") is not None and m["author_account_age_days"] < 3:
        out.append("account younger than 3 days")
    fol, ing = m.get("author_followers"), m.get("author_following")
    if fol is not None and ing is not None and ing >= 1000 and ing > 50 * max(fol, 1):
        out.append(f"follows {ing} accounts with {fol} followers")
    if d.get("handle_digits", 0) >= 6:
        out.append("handle ends in a long run of digits")
    return out


def screen_stage(env: StageEnv, cfg: MarketingConfig) -> StageReport:
    """Posts in a language the program does not serve, spam (the brief's phrases, too many links or hashtags,
    the same text from several authors) and bots (two or more signals) are resolved at once with the reason;
    the rest go on to sentiment. The program's own records go down their part of the chain."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "screen")
    # copy-paste campaigns: one normalised text from three or more authors in the batch
    norm = {r["item_id"]: re.sub(r"\W+", " ", r["data"].get("text", "").casefold()).strip() for r in rows}
    authors: dict[str, set[str]] = {}
    for r in rows:
        if r["data"].get("kind") == "post":
            authors.setdefault(norm[r["item_id"]], set()).add(r["data"]["author_ref"])
    updates, counts = [], Counter()
    for r in rows:
        d = dict(r["data"])
        if d["kind"] == "asset_request":
            updates.append(ItemUpdate(r["item_id"], "requested", d))
            continue
        if d["kind"] == "allocation":
            updates.append(ItemUpdate(r["item_id"], "proposed", d))
            continue
        lang = language(d["text"], d.get("lang_tag"))
        d["lang"] = lang
        reasons = []
        if lang not in s.languages and lang != "und":
            reasons.append(f"language {lang} (the program listens in {', '.join(s.languages)})")
        reasons += spam_reasons(d["text"], s)
        if len(authors.get(norm[r["item_id"]], ())) >= 3 and len(norm[r["item_id"]]) > 20:
            reasons.append(f"same text from {len(authors[norm[r['item_id']]])} authors")
        bots = bot_signals(d)
        if len(bots) >= s.bot_signals_needed:
            reasons.append("bot: " + "; ".join(bots))
        if reasons:
            kind = "language" if reasons[0].startswith("language") else "bot" if reasons[0].startswith("bot") else "spam"
            d["filtered"] = {"kind": kind, "reasons": reasons}
            counts[f"filtered_{kind}"] += 1
            updates.append(ItemUpdate(r["item_id"], "resolved", d, "routed", columns={"resolved_at": started}))
        else:
            counts["kept"] += 1
            updates.append(ItemUpdate(r["item_id"], "screened", d))
    md = {"posts_kept": counts["kept"], **{k: v for k, v in counts.items() if k != "kept"},
          "asset_requests": sum(1 for u in updates if u.status == "requested"),
          "allocations": sum(1 for u in updates if u.status == "proposed")}
    return commit_stage(env, "screen", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- sentiment: a model task through the gateway -----------------------------------------------------------

class SentimentOutput(LLMOutput):
    label: Literal["negative", "neutral", "positive"]
    score: float = Field(ge=0, le=1, description="the probability of the label")
    model_version: str | None = Field(None, max_length=80, description="set by the embedded model")


def sentiment_model(model_dir: Path | None = None, progress=None):
    """The sentiment model the program serves (``lib.sentiment``: lexicon features plus a classifier trained on
    TweetEval's labelled dev tweets, $ORCH_DATA_DIR/tweets-dev), kept in $ORCH_MODELS_DIR/sentiment and
    trained on first use (a few seconds). Raises ``datasets.DatasetMissing`` without the tweets."""
    from ...lib import datasets, sentiment
    from ...lib.llm import model_cache
    from ...lib.settings import Settings

    folder = model_dir or Settings.from_env().models_dir / "sentiment"
    pointer = folder / "latest.json"
    if pointer.is_file():
        try:  # loaded once per process (every stage run builds its gateway, and with it this task)
            return model_cache.load(SENTIMENT_TASK, str(folder / json.loads(pointer.read_text())["path"]),
                                    sentiment.SentimentModel.load)
        except (OSError, ValueError, KeyError):
            pass  # another code version wrote it: train again below
    texts, labels = datasets.read_tweets()
    if progress:
        progress(f"training the sentiment model on {len(texts)} labelled tweets ...")
    model = sentiment.train(texts, labels)
    path = model.save(folder)
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": model.version, "path": path.name}))
    tmp.replace(pointer)
    return model


class SentimentTask:
    """The embedded provider's handler of ``marketing_sentiment``: the trained model, or -- without the labelled
    tweets to train it -- VADER's lexicon alone (recorded as the model, so a reader sees the fallback)."""

    def __init__(self, model=None):
        self.trained = model
        self.model = model.version if model is not None else "sentiment-vader-lexicon"

    def run(self, requests, prompt_vars) -> list:
        import time

        from ...lib.llm.gateway import ProviderResult, estimate_tokens

        if not requests:
            return []
        t0 = time.perf_counter()
        texts = [r.inputs.text for r in requests]
        if self.trained is not None:
            got = self.trained.predict(texts)
        else:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            sia = SentimentIntensityAnalyzer()
            got = []
            for t in texts:
                c = sia.polarity_scores(t)["compound"]
                label = "positive" if c >= 0.05 else "negative" if c <= -0.05 else "neutral"
                got.append({"label": label, "score": round(0.5 + abs(c) / 2 if label != "neutral" else 1 - abs(c), 4)})
        per = (time.perf_counter() - t0) * 1000.0 / len(requests)
        return [ProviderResult({**g, "model_version": self.model}, estimate_tokens(r.inputs.text), 8, per)
                for r, g in zip(requests, got)]


def sentiment_local_task(db):
    from ...lib import datasets

    try:
        return SentimentTask(sentiment_model())
    except datasets.DatasetMissing:
        return SentimentTask(None)


def sentiment_stage(env: StageEnv, cfg: MarketingConfig, gateway) -> StageReport:
    """Negative / neutral / positive with the label's probability, for every kept post (masked text only)."""
    started = utcnow()
    rows = load_stage_items(env, "sentiment")
    reqs = [LLMStepRequest(id=r["item_id"], inputs={"text": r["data"]["text"], "context": {}}) for r in rows]
    responses, stats = gateway.run(SENTIMENT_TASK, reqs, SentimentOutput) if reqs else ([], None)
    updates = []
    for r, resp in zip(rows, responses):
        if not resp.ok:
            updates.append(model_step_failed(r, "sentiment", resp))
            continue
        d = without_deferred(r["data"])
        d["sentiment"] = {"label": resp.output.label, "score": round(float(resp.output.score), 4),
                          "model": resp.output.model_version or "provider"}
        updates.append(ItemUpdate(r["item_id"], "scored", d))
    md = stats.as_metadata("sentiment") if stats else {}
    md["labels"] = dict(Counter(u.data["sentiment"]["label"] for u in updates if "sentiment" in u.data))
    return commit_stage(env, "sentiment", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- topics and urgency ---------------------------------------------------------------------------------------

STOP = frozenset("""a about above after again against all am an and any are aren't as at be because been before being
below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he her here hers herself him himself his how i i'm
if in into is isn't it it's its itself just let's me more most my myself no nor not now of off on once only or other
ought our ours ourselves out over own same she should so some such than that that's the their theirs them
themselves then there these they this those through to too under until up very was wasn't we were what when where
which while who whom why will with won't would you your yours yourself yourselves im ive dont cant get got like
one also still really today yesterday tomorrow new great good bad thanks thank please love hate amazing awful
anyone someone everyone day week time year guys lol omg via rt amp""".split())


def _singular(w: str) -> str:
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def _words(text: str) -> list[str]:
    return [_singular(w) for w in re.findall(r"[a-z][a-z'-]+", re.sub(r"<[A-Z_]+>|" + URL.pattern, " ", text.casefold()))]


def theme_of(text: str, s: MarketingSettings) -> tuple[str, str] | None:
    """(theme id, the keyword that matched) of the first brief theme with most keyword hits."""
    words = set(_words(text))
    low = " " + " ".join(_words(text)) + " "
    best = None
    for t in s.themes:
        hits = [k for k in t.keywords if (" " in k and f" {k.casefold()} " in low) or _singular(k.casefold()) in words]
        if hits and (best is None or len(hits) > best[2]):
            best = (t.id, hits[0], len(hits))
    return (best[0], best[1]) if best else None


def keyphrase(text: str, s: MarketingSettings) -> str | None:
    """The post's keyphrase: a hashtag (segmented into words), else its most specific content bigram or word;
    the brand's own name never counts."""
    from ...lib.sentiment import split_hashtag

    brand = set(_words(s.brand)) | {h.lstrip("@").casefold() for h in s.brand_handles}
    for tag in HASHTAG.findall(text):
        words = [w for w in _words(split_hashtag(tag[1:])) if w not in STOP and w not in brand]
        if words:
            return " ".join(words[:2])
    words = [w for w in _words(text) if w not in STOP and w not in brand and len(w) >= 4]
    if not words:
        return None
    seq = [w for w in _words(text)]
    for a, b in zip(seq, seq[1:]):
        if a in words and b in words:
            return f"{a} {b}"
    return max(words, key=len)


def topic_id(phrase: str, known: set[str]) -> str:
    """A keyphrase's stable id: its canonical slug, or the known id it is a near-spelling of (rapidfuzz)."""
    from rapidfuzz import fuzz, process

    slug = "kp-" + re.sub(r"[^a-z0-9]+", "-", phrase.casefold()).strip("-")
    if slug in known or not known:
        return slug
    hit = process.extractOne(slug, [k for k in known if k.startswith("kp-")], scorer=fuzz.ratio, score_cutoff=90)
    return hit[0] if hit else slug


def urgency(text: str, sentiment: str, s: MarketingSettings) -> tuple[str | None, list[str]]:
    """``outage`` (a cue of the service being down, whatever the tone), ``complaint`` (a negative post with a
    complaint cue) or None, with the cues found."""
    low = text.casefold()
    outage = [c for c in s.outage_cues if re.search(r"\b" + re.escape(c.casefold()) + r"\b", low)]
    if outage:
        return "outage", outage
    complaint = [c for c in s.complaint_cues if re.search(r"\b" + re.escape(c.casefold()) + r"\b", low)]
    if complaint and sentiment == "negative":
        return "complaint", complaint
    return None, []


def brands_named(text: str, s: MarketingSettings) -> list[str]:
    """The brands a post names (ours by name, first word or handle; the competitors by name): share of voice, and
    only posts about us are handed to our support."""
    low = text.casefold()
    ours = [s.brand.casefold(), s.brand.split()[0].casefold(), *(h.casefold() for h in s.brand_handles)]
    out = [s.brand] if any(re.search(r"(?<![\w])" + re.escape(x) + r"\b", low) for x in ours) else []
    return out + [c for c in s.competitors if re.search(r"\b" + re.escape(c.casefold()) + r"\b", low)]


def known_topics(env: StageEnv) -> set[str]:
    """Topic ids the program has given posts so far (every partition)."""
    from ...lib.store import items

    with env.db.begin() as conn:
        got = conn.execute(sa.select(items.c.data["topic"]["id"].as_string()).where(
            items.c.flow == env.flow, items.c.status.in_(("topical", "resolved"))).distinct()).scalars()
        return {t for t in got if t}


def topics_stage(env: StageEnv, cfg: MarketingConfig) -> StageReport:
    """Each post's topic (the brief's theme whose keywords it names, else its keyphrase; ids stable across
    partitions) and its urgency (outage report, or a complaint: a negative post with a complaint cue)."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "topics")
    themes = {r["item_id"]: theme_of(r["data"]["text"], s) for r in rows}
    phrases = {r["item_id"]: keyphrase(r["data"]["text"], s) for r in rows if themes[r["item_id"]] is None}
    known = known_topics(env) if any(phrases.values()) else set()  # only a keyphrase needs the ids given so far
    updates, counts = [], Counter()
    for r in rows:
        d = dict(r["data"])
        theme = themes[r["item_id"]]
        if theme:
            d["topic"] = {"id": theme[0], "source": "theme", "evidence": theme[1]}
        elif (kp := phrases[r["item_id"]]) is not None:
            tid = topic_id(kp, known)
            known.add(tid)
            d["topic"] = {"id": tid, "source": "keyphrase", "evidence": kp}
        else:
            d["topic"] = {"id": "other", "source": "none", "evidence": None}
        d["brands"] = brands_named(d["text"], s)
        kind, cues = urgency(d["text"], d["sentiment"]["label"], s) if s.brand in d["brands"] else (None, [])
        d["urgency"] = {"kind": kind, "cues": cues} if kind else None
        counts[kind or "none"] += 1
        updates.append(ItemUpdate(r["item_id"], "topical", d))
    md = {"topics": dict(Counter(u.data["topic"]["id"] for u in updates).most_common(15)),
          "complaints": counts["complaint"], "outage_reports": counts["outage"]}
    return commit_stage(env, "topics", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- hand-off: complaints and outage reports to support -----------------------------------------------------

def support_event(r: dict[str, Any], handle: str, s: MarketingSettings) -> dict[str, Any]:
    """The support intake record of an urgent post (the receiving flow's contract: a social message)."""
    d = r["data"]
    what = "reports an outage" if d["urgency"]["kind"] == "outage" else "complains"
    return {"id": f"{FLOW}-{d['platform']}-{d['post_id']}", "channel": "social",
            "received_at": r["received_at"].isoformat(), "sender": {"handle": f"{d['platform']}:{handle}"},
            "subject": f"Public {d['platform']} post {what} ({d['topic']['id']})", "body": d["text"]}


def handoff_stage(env: StageEnv, cfg: MarketingConfig) -> StageReport:
    """An urgent post becomes an intake event of the support flow (``lib.intake.hand_over``: one submission per
    post id, however often this runs); every post is then resolved. A post whose hand-over cannot be made now
    (the support flow is not loaded) stays here for the next run."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "handoff")
    urgent = [r for r in rows if r["data"].get("urgency")]
    handles = vault_values(env.db, env.flow, [r["item_id"] for r in urgent]) if urgent else {}
    events = [support_event(r, handles.get(r["item_id"], {}).get("HANDLE", "unknown"), s) for r in urgent]
    added, failure = 0, None
    if events:
        try:
            added = hand_over(env.db, env.flow, s.complaints_to, events)
        except KeyError as exc:
            failure = str(exc)
    updates, audit_rows = [], []
    for r in rows:
        d = dict(r["data"])
        if d.get("urgency") and failure:
            updates.append(ItemUpdate(r["item_id"], "topical", d, "waiting"))
            continue
        if d.get("urgency"):
            d["handed_to"] = {"flow": s.complaints_to, "event_id": f"{FLOW}-{d['platform']}-{d['post_id']}",
                              "at": started.isoformat()}
            audit_rows.append({"actor": "system:handoff", "action": "handed_over", "flow": env.flow,
                               "item_id": r["item_id"], "trace_id": r["trace_id"],
                               "reason": f"{d['urgency']['kind']} ({', '.join(d['urgency']['cues'][:3])}) to "
                                         f"{s.complaints_to}", "outputs": {"event_id": d["handed_to"]["event_id"]}})
        updates.append(ItemUpdate(r["item_id"], "resolved", d, columns={"resolved_at": started}))
    md = {"handed_over": len(events) if not failure else 0, "new_support_events": added,
          "already_handed_over": (len(events) - added) if not failure else 0}
    if failure:
        md["handoff_waiting"] = failure
    return commit_stage(env, "handoff", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        audit_rows=audit_rows, metadata=md)


# --- the channels: publishing, budgets and the platforms' reporting (an embedded system) -------------------

channel_publications = system_table(
    "channel_publications",
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("variant", sa.String(8), nullable=False),
    sa.Column("topic", sa.String(64)),
    sa.Column("content", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, doc="published | retracted"),
    sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
)
channel_budgets = system_table(
    "channel_budgets",
    sa.Column("period", sa.String(10), nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("amount", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, doc="active | voided"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
channel_metrics = sa.Table(
    "channel_metrics", cmeta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("date", sa.String(10), nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("asset", sa.String(255), nullable=False, doc="the asset item id"),
    sa.Column("variant", sa.String(8), nullable=False),
    sa.Column("topic", sa.String(64)),
    sa.Column("impressions", sa.Integer, nullable=False),
    sa.Column("clicks", sa.Integer, nullable=False),
    sa.Column("conversions", sa.Integer, nullable=False),
    sa.Column("spend", sa.Float, nullable=False),
    sa.Column("revenue", sa.Float, nullable=False),
    sa.UniqueConstraint("date", "channel", "asset", "variant"),
)
channel_engagements = sa.Table(
    "channel_engagements", cmeta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("contact_id", sa.String(64), nullable=False, doc="the CRM contact who engaged (e-mail campaigns)"),
    sa.Column("asset", sa.String(255), nullable=False),
    sa.Column("topic", sa.String(64)),
    sa.Column("clicked", sa.Boolean, nullable=False),
    sa.Column("converted", sa.Boolean, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("contact_id", "asset"),
)


MARKETING_TABLES = (channel_publications, channel_budgets, channel_metrics, channel_engagements)


def ensure_tables(conn) -> None:
    """The channels' tables, for a writer that goes to the connectors database directly (the demo's world, tests);
    reads and deliveries through the connectors client create them themselves."""
    cmeta.create_all(conn, tables=list(MARKETING_TABLES))


def _record(conn, table: sa.Table, e, values: dict[str, Any], ref: str) -> Delivery:
    """One record per idempotency key: a repeated key returns the original record."""
    rid = conn.execute(sa.select(table.c.id).where(table.c.idempotency_key == e.idempotency_key)).scalar()
    if rid is None:
        rid = conn.execute(table.insert().values(**base_row(e), **values)).inserted_primary_key[0]
    return Delivery(e.idempotency_key, True, f"channels:{ref}:{rid}")


def _deliver(conn, effects) -> list[Delivery]:
    now = utcnow()
    out = []
    for e in effects:
        p = e.payload
        if e.action == "publish":
            out.append(_record(conn, channel_publications, e, {
                "channel": p["channel"], "variant": p["variant"], "topic": p.get("topic"), "content": p["content"],
                "status": "published", "published_at": now}, "publication"))
        else:
            out.append(_record(conn, channel_budgets, e, {
                "period": p["period"], "channel": p["channel"], "amount": float(p["amount"]), "status": "active",
                "created_at": now}, "budget"))
    return out


def _read_metrics(conn, since: str | None = None) -> list[dict[str, Any]]:
    q = sa.select(channel_metrics)
    if since:
        q = q.where(channel_metrics.c.date >= since)
    return [dict(r) for r in conn.execute(q.order_by(channel_metrics.c.date, channel_metrics.c.id)).mappings()]


def _read_engagements(conn) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sa.select(channel_engagements).order_by(channel_engagements.c.id)).mappings()]


def _read_budgets(conn) -> dict[str, dict[str, float]]:
    """``{period: {channel: amount}}`` of the budgets in force (voided ones left out)."""
    out: dict[str, dict[str, float]] = {}
    for period, ch, amount in conn.execute(sa.select(channel_budgets.c.period, channel_budgets.c.channel,
                                                     channel_budgets.c.amount).where(
            channel_budgets.c.status == "active").order_by(channel_budgets.c.id)):
        out.setdefault(period, {})[ch] = amount
    return out


def _read_publications(conn) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sa.select(channel_publications).order_by(channel_publications.c.id)).mappings()]


CHANNELS = System(
    "marketing_channels", channel_publications, row=lambda e, now: {},
    handlers={"publish": _deliver, "set_budget": _deliver,
              "retract": void_by_effect_key(channel_publications, "channels", "retracted"),
              "void_budget": void_by_effect_key(channel_budgets, "channels", "voided")},
    same_record=("item_id", "variant"),
    readers={"metrics": _read_metrics, "engagements": _read_engagements, "budgets": _read_budgets,
             "publications": _read_publications})


def iso_week(day: date) -> str:
    y, w, _ = day.isocalendar()
    return f"{y}-W{w:02d}"


def week_days(week: str) -> list[date]:
    y, w = week.split("-W")
    return [date.fromisocalendar(int(y), int(w), d) for d in range(1, 8)]
