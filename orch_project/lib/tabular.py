"""A generic, calibrated binary scorer for tables of whatever columns a CSV has, with per-row reasons.

    model = train(df, "Converted", id_column="Prospect ID", exclude_columns=("Tags",), name="lead_score")
    model.predict_proba(new_df)        # calibrated P(label = 1), one float per row
    model.score(new_df)                # [{"id", "score", "reasons": ["Lead Source = Reference (+0.21)", ...]}]
    evaluate(model, test_df, "Converted")   # {"n", "auc", "accuracy", "log_loss", "brier", "lift_top_decile"}
    path = model.save(folder); TabularModel.load(path)

It is shared platform code: nothing in it knows which flow uses it.

Column typing (``infer_schema``), from the training data only. Strings are stripped and placeholder
answers (``Select``, empty, ``nan``, ``None``, ``N/A``, ``-``, ``unknown`` ...; ``PLACEHOLDERS``) become
missing. Then each column gets one role:

* ``id``: the ``id_column``, or a column whose values are all distinct and look like keys (short strings
  without spaces, or integers with an id-like name or in sorted order). Never a feature.
* ``numeric``: numbers, including numbers stored as text (at least 95 % of the filled values parse).
* ``boolean``: two values from yes/no, true/false, y/n, t/f, 0/1 (as text).
* ``datetime``: ISO or d/m/y dates, as days since 1970 (a trend feature; mind drift when scoring later).
* ``text``: free text, i.e. mostly distinct values of several words. It becomes two features: a text score
  (the out-of-fold log-odds of a TF-IDF word/bigram logistic regression, so the boosted trees get the text
  signal as one number without seeing their own labels through it) and the number of words.
* ``categorical``: the rest. Case and spacing variants are merged (``google`` = ``Google``), levels seen
  fewer than ``max(10, 0.2 %)`` times are pooled into one "other" level (at most 250 levels kept), and at
  scoring time a level never seen in training counts as that rare level (or as missing when there was none).
* ``dropped``: constant columns, empty ones (all placeholders), excluded ones and the label.

Model. ``HistGradientBoostingClassifier`` (scikit-learn only) on those features, with native categorical
splits on the ordinal codes and native missing-value handling. A small search over a few configurations
(shallow/deep trees, learning rate, leaf size, L2, feature subsampling) picks the best by 5-fold
out-of-fold AUC; every fit stops early on an internal 10 % validation split, so the number of trees is
learnt. Next to it a regularised logistic regression on one-hot codes, binned numbers and the text score;
the two log-odds are blended with the weight (0 to 0.5) that maximises the same out-of-fold AUC, and the
blend is kept only when it helps. The final model is refitted on all rows with the chosen configuration
and the median number of trees found in the folds.

Calibration: Platt scaling (a logistic fit of the label on the blended log-odds) on the out-of-fold
predictions of all training rows, i.e. on scores of models that did not see those rows. Chosen over
isotonic regression because (1) boosted trees trained on log-loss are already close to calibrated up to
a scale, which is what two parameters fix, with little variance on a few thousand rows; (2) it is strictly
monotonic, so it keeps the ranking (AUC) and creates no ties; (3) it is smooth, so the per-row reasons,
computed in log-odds, stay consistent with the score (isotonic steps would give zero or infinite changes).
``metrics["calibration"]`` reports the out-of-fold expected calibration error.

Reasons (``explain``/``score``): occlusion in calibrated log-odds. For each original column the row's value
is replaced by the column's *neutral* value, chosen at training time among missing, the frequent levels
and quantiles as the one whose substitution moves the average training score least; the change in
log-odds is that column's contribution. So contributions average about zero over training rows, and a
row's reason reads "this value, compared with a neutral one, moved the score by so much". A text column is
occluded as a whole (score and length together) and its reason names the word that weighs most.
One occlusion per column and row, batched: (columns + 1) model evaluations per row.

Everything is deterministic given ``seed``. Saved models are joblib files with a JSON sidecar of their
metadata; loading a file written by another ``CODE_VERSION`` (or scikit-learn version) fails with a message
saying to retrain.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

CODE_VERSION = "tabular-hgb-lr-blend-platt-v1"
PLACEHOLDERS = frozenset({
    "", "select", "nan", "none", "null", "nil", "n/a", "na", "n.a.", "#n/a", "-", "--", "---", "?", "unknown",
    "not known", "not specified", "not provided", "not available", "undefined", "(blank)", "blank", "missing",
    "please select", "select one", "choose", "--select--", "-select-", "(none)",
})
POSITIVE_LABELS = frozenset({"1", "1.0", "true", "t", "yes", "y", "converted", "won", "positive", "pos", "success"})
NEGATIVE_LABELS = frozenset({"0", "0.0", "false", "f", "no", "n", "not converted", "not_converted", "notconverted",
                             "unconverted", "not", "lost", "negative", "neg", "failure"})
BOOLEAN_TRUE = frozenset({"yes", "y", "true", "t", "1"})
BOOLEAN_FALSE = frozenset({"no", "n", "false", "f", "0"})
ID_NAME_TOKENS = frozenset({"id", "uuid", "guid", "key", "number", "no", "num", "ref", "code", "identifier"})
MAX_LEVELS = 250  # HistGradientBoosting handles at most 255 categories (max_bins)
N_FOLDS = 5
SEARCH_BUDGET_SECONDS = 35.0  # stop trying configurations after this (the best so far is kept)
# OpenMP threads for fitting (scoring, with its large batches, uses every core). Tables of a few
# thousand rows gain little from a second
# thread, and when the cores are shared (a CI run, other workers) the trees' many small parallel
# regions wait on descheduled threads: a 9,000-row training measured 41 s with 2 threads on a busy
# 2-core machine and 15 s with 1. Larger tables use every core.
SINGLE_THREAD_ROWS = 50_000
OTHER = "__other__"
DATE_RE = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}(:\d{2})?(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$|"
                     r"^\d{1,2}/\d{1,2}/\d{2,4}( \d{1,2}:\d{2}(:\d{2})?)?$")

# The configurations tried, most likely first (so a tight time budget still tries the good ones).
CONFIGS: tuple[dict, ...] = (
    {"learning_rate": 0.08, "max_leaf_nodes": 7, "min_samples_leaf": 40, "l2_regularization": 0.0},
    {"learning_rate": 0.06, "max_leaf_nodes": 15, "min_samples_leaf": 20, "l2_regularization": 1.0},
    {"learning_rate": 0.06, "max_leaf_nodes": 31, "min_samples_leaf": 30, "l2_regularization": 1.0,
     "max_features": 0.6},
    {"learning_rate": 0.04, "max_leaf_nodes": 48, "min_samples_leaf": 50, "l2_regularization": 3.0,
     "max_features": 0.5},
)


class TabularError(ValueError):
    """Input the scorer cannot use (label column missing, one class only, no usable feature ...)."""


class ModelVersionError(RuntimeError):
    """A saved model written by another code or scikit-learn version."""


# ----------------------------------------------------------------------------------------------- typing


def clean_strings(s: pd.Series) -> pd.Series:
    """Strings stripped, inner whitespace collapsed, placeholder answers as missing (None)."""
    present = s.notna()
    out = s.astype(str).str.replace(r"\s+", " ", regex=True).str.strip()
    keep = present & ~out.str.casefold().isin(PLACEHOLDERS)
    return out.astype(object).where(keep, None)


def _to_numeric(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").astype(float)


def parse_labels(s: pd.Series) -> np.ndarray:
    """0/1 floats (NaN where missing) from 0/1, true/false, yes/no, converted/not converted ..."""
    if pd.api.types.is_bool_dtype(s):
        return s.astype(float).to_numpy()
    if pd.api.types.is_numeric_dtype(s):
        v = s.astype(float).to_numpy()
        bad = sorted(set(v[~np.isnan(v)]) - {0.0, 1.0})
        if bad:
            raise TabularError(f"label values must be 0/1, true/false, yes/no or converted/not converted; "
                               f"found {bad[:5]}")
        return v
    keys = s.map(lambda x: None if x is None or (isinstance(x, float) and math.isnan(x))
                 else re.sub(r"\s+", " ", str(x)).strip().casefold())
    out = np.full(len(s), np.nan)
    pos, neg = keys.isin(POSITIVE_LABELS).to_numpy(), keys.isin(NEGATIVE_LABELS).to_numpy()
    out[pos], out[neg] = 1.0, 0.0
    unknown = sorted({k for k in keys[~(pos | neg)] if k not in (None, "")})
    if unknown:
        raise TabularError(f"label values must be 0/1, true/false, yes/no or converted/not converted; "
                           f"found {unknown[:5]}")
    return out


@dataclass
class Column:
    """One original column: its role and what is needed to turn it into features and reasons."""

    name: str
    role: str  # id | numeric | boolean | datetime | categorical | text | dropped
    why: str = ""  # for id / dropped: why
    levels: list[str] = field(default_factory=list)  # categorical: display value per code
    index: dict[str, int] = field(default_factory=dict)  # categorical: casefolded value -> code
    other_code: int | None = None  # categorical: code of the pooled rare levels
    quantiles: tuple[float, float] = (0.0, 0.0)  # numeric: 25 % and 75 % (for "high"/"low")
    frequent: list[float] = field(default_factory=list)  # numeric: values filling >= 10 % of rows
    text_model: Any = None  # text: (vectorizer, logistic regression)

    @property
    def is_feature(self) -> bool:
        return self.role not in ("id", "dropped")

    @property
    def width(self) -> int:
        return 2 if self.role == "text" else 1


def _looks_like_id(name: str, raw: pd.Series, n: int) -> bool:
    v = raw.dropna()
    if n < 20 or len(v) < 0.95 * n or v.nunique() != len(v):
        return False
    tokens = set(re.split(r"[^a-z0-9]+", name.casefold()))
    if pd.api.types.is_numeric_dtype(v):
        f = v.astype(float)
        integral = bool(np.all(np.floor(f) == f))
        return integral and (bool(tokens & ID_NAME_TOKENS) or f.is_monotonic_increasing or f.is_monotonic_decreasing)
    s = v.astype(str)
    return bool(s.str.len().mean() <= 64 and (~s.str.contains(r"\s")).mean() >= 0.95)


def _infer_column(name: str, raw: pd.Series, n: int) -> tuple[Column, pd.Series | None]:
    """The column's role from its values; the cleaned series for text/categorical columns."""
    if _looks_like_id(name, raw, n):
        return Column(name, "id", "distinct key-like values"), None
    if pd.api.types.is_bool_dtype(raw):
        raw = raw.astype(float)
    if pd.api.types.is_numeric_dtype(raw):
        v = raw.astype(float)
        if v.nunique(dropna=True) <= 1 and (v.isna().mean() < 0.01 or v.notna().sum() == 0):
            return Column(name, "dropped", "constant" if v.notna().any() else "all missing"), None
        return Column(name, "numeric"), None
    s = clean_strings(raw)
    filled = s.dropna()
    if filled.empty:
        return Column(name, "dropped", "all missing or placeholders"), None
    distinct = filled.str.casefold().unique()
    if len(distinct) == 1 and s.isna().mean() < 0.01:
        return Column(name, "dropped", "constant"), None
    if set(distinct) <= (BOOLEAN_TRUE | BOOLEAN_FALSE) and len(distinct) == 2:
        return Column(name, "boolean"), None
    as_num = _to_numeric(filled)
    if as_num.notna().mean() >= 0.95:
        return Column(name, "numeric"), None
    if filled.head(200).str.match(DATE_RE).mean() >= 0.95:
        return Column(name, "datetime"), None
    unique_share = len(distinct) / len(filled)
    words = filled.str.count(" ") + 1
    if len(filled) >= 20 and unique_share >= 0.3 and words.mean() >= 4:
        return Column(name, "text"), s
    return Column(name, "categorical"), s


def _fit_levels(col: Column, s: pd.Series, n: int) -> None:
    keys = s.dropna().str.casefold()
    counts = keys.value_counts()
    display = s.dropna().groupby(keys).agg(lambda x: x.value_counts().index[0])
    min_count = max(10, math.ceil(0.002 * n))
    kept = [k for k, c in counts.items() if c >= min_count][:MAX_LEVELS]
    col.levels = [display[k] for k in kept]
    col.index = {k: i for i, k in enumerate(kept)}
    if len(kept) < len(counts):
        col.other_code = len(kept)
        col.levels.append(OTHER)


def _to_datetime_days(s: pd.Series) -> pd.Series:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = pd.to_datetime(s, errors="coerce", format="mixed", utc=True)
    return (d - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds() / 86400.0


# ------------------------------------------------------------------------------------------- features


def _tokenizer_pattern() -> str:
    return r"(?u)\b[^\W\d_][^\W\d_]+\b"


def _text_model(texts: list[str], y: np.ndarray, seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(lowercase=True, ngram_range=(1, 2), min_df=3, max_features=20000, sublinear_tf=True,
                          token_pattern=_tokenizer_pattern())
    xt = vec.fit_transform(texts)
    lr = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    lr.fit(xt, y)
    return vec, lr


def _text_logit(model, texts: list[str]) -> np.ndarray:
    vec, lr = model
    return lr.decision_function(vec.transform(texts))


class _Features:
    """Original columns -> the numeric feature matrix the models read (one or two features per column)."""

    def __init__(self, columns: list[Column]):
        self.columns = [c for c in columns if c.is_feature]
        self.slices: dict[str, slice] = {}
        i = 0
        for c in self.columns:
            self.slices[c.name] = slice(i, i + c.width)
            i += c.width
        self.width = i
        self.categorical = np.zeros(self.width, dtype=bool)
        for c in self.columns:
            if c.role == "categorical":
                self.categorical[self.slices[c.name].start] = True
        self.names = [n for c in self.columns for n in ([c.name] if c.width == 1 else
                                                         [f"{c.name} (text score)", f"{c.name} (words)"])]

    def cleaned(self, df: pd.DataFrame) -> dict[str, pd.Series]:
        """Each feature column's cleaned values (missing columns read as all missing)."""
        out = {}
        for c in self.columns:
            raw = df[c.name] if c.name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)
            if c.role == "numeric" and pd.api.types.is_numeric_dtype(raw):
                out[c.name] = raw.astype(float)
            else:
                out[c.name] = clean_strings(raw)
        return out

    def matrix(self, clean: dict[str, pd.Series], n: int, text_scores: dict[str, np.ndarray] | None = None) -> np.ndarray:
        x = np.full((n, self.width), np.nan)
        for c in self.columns:
            s, j = clean[c.name], self.slices[c.name].start
            if c.role == "numeric":
                x[:, j] = s.to_numpy(float) if pd.api.types.is_float_dtype(s) else _to_numeric(s).to_numpy()
            elif c.role == "datetime":
                x[:, j] = _to_datetime_days(s).to_numpy(float)
            elif c.role == "boolean":
                k = s.map(lambda v: None if v is None else v.casefold())
                x[:, j] = np.where(k.isin(BOOLEAN_TRUE), 1.0, np.where(k.isin(BOOLEAN_FALSE), 0.0, np.nan))
            elif c.role == "categorical":
                unseen = np.nan if c.other_code is None else float(c.other_code)
                x[:, j] = [np.nan if v is None else c.index.get(v.casefold(), unseen) for v in s]
            elif c.role == "text":
                present = s.notna().to_numpy()
                if text_scores is not None and c.name in text_scores:
                    score = text_scores[c.name]
                else:
                    score = np.full(n, np.nan)
                    if present.any():
                        score[present] = _text_logit(c.text_model, s[present].tolist())
                x[:, j] = np.where(present, score, np.nan)
                x[:, j + 1] = np.where(present, s.fillna("").str.count(" ").to_numpy() + 1, np.nan)
        return x


class _LinearEncoder:
    """The feature matrix as a sparse design for the logistic regression: one-hot codes (missing and
    unseen included), numbers in quantile bins plus a missing indicator, the text score standardised."""

    def fit(self, x: np.ndarray, categorical: np.ndarray, text_score_cols: Iterable[int]) -> "_LinearEncoder":
        self.plan: list[tuple[str, int, Any]] = []
        text_cols = set(text_score_cols)
        for j in range(x.shape[1]):
            v = x[:, j]
            f = v[~np.isnan(v)]
            if j in text_cols:
                mu, sd = (float(f.mean()), float(f.std()) or 1.0) if len(f) else (0.0, 1.0)
                self.plan.append(("scaled", j, (mu, sd)))
            elif categorical[j] or len(np.unique(f)) <= 12:
                self.plan.append(("onehot", j, np.unique(f)))
            else:
                edges = np.unique(np.quantile(f, np.linspace(0.1, 0.9, 9)))
                self.plan.append(("bins", j, edges))
        return self

    def transform(self, x: np.ndarray):
        import scipy.sparse as sp

        blocks = []
        for kind, j, p in self.plan:
            v = x[:, j]
            miss = np.isnan(v)
            if kind == "scaled":
                blocks.append(sp.csr_matrix(np.c_[np.where(miss, 0.0, (v - p[0]) / p[1]), miss]))
                continue
            if kind == "onehot":
                codes = np.searchsorted(p, v)
                codes = np.where(miss | (codes >= len(p)) | (p[np.minimum(codes, len(p) - 1)] != v), len(p), codes)
                k = len(p) + 1
            else:
                codes = np.where(miss, len(p) + 1, np.searchsorted(p, v, side="right"))
                k = len(p) + 2
            blocks.append(sp.csr_matrix((np.ones(len(v)), (np.arange(len(v)), codes)), shape=(len(v), k)))
        return sp.hstack(blocks, format="csr")


def _threads(n_rows: int):
    """A context limiting OpenMP/BLAS threads to 1 for tables up to ``SINGLE_THREAD_ROWS`` rows."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return threadpool_limits(1) if n_rows <= SINGLE_THREAD_ROWS else nullcontext()


def _hgb(config: dict, seed: int, max_iter: int = 1000, early: bool = True):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=max_iter, early_stopping=early, validation_fraction=0.1 if early else None, n_iter_no_change=30,
        scoring="loss", random_state=seed, **config)


def _lr(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.3, max_iter=3000, random_state=seed)


# ------------------------------------------------------------------------------------------- metrics


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """n, AUC, accuracy at 0.5, log loss, Brier score and lift of the top decile for labels 0/1."""
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    y = np.asarray(y, dtype=int)
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    rate = y.mean()
    top = np.argsort(-p, kind="stable")[: max(1, math.ceil(0.1 * len(y)))]
    return {
        "n": int(len(y)),
        "auc": round(float(roc_auc_score(y, p)), 4) if 0 < rate < 1 else None,
        "accuracy": round(float(((p >= 0.5) == y).mean()), 4),
        "log_loss": round(float(log_loss(y, p, labels=[0, 1])), 4),
        "brier": round(float(brier_score_loss(y, p)), 4),
        "lift_top_decile": round(float(y[top].mean() / rate), 3) if rate > 0 else None,
    }


def calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error over equal-count bins, and mean predicted vs observed rate."""
    order = np.argsort(p, kind="stable")
    ece = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk):
            ece += len(chunk) / len(p) * abs(p[chunk].mean() - y[chunk].mean())
    return {"ece": round(float(ece), 4), "mean_predicted": round(float(p.mean()), 4),
            "observed_rate": round(float(y.mean()), 4), "method": "platt"}


def data_hash(df: pd.DataFrame) -> str:
    h = hashlib.sha256()
    h.update("\x1f".join(map(str, df.columns)).encode())
    h.update(pd.util.hash_pandas_object(df.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- model


@dataclass
class TabularModel:
    """A trained scorer: column typing, boosted trees (+ optional logistic blend), Platt calibration,
    neutral values for reasons, and the training figures (``metrics``)."""

    columns: list[Column]
    label_column: str
    id_column: str | None
    hgb: Any
    linear: Any  # (encoder, logistic regression) or None
    blend: float  # weight of the logistic regression's log-odds
    platt: tuple[float, float]  # p = sigmoid(a * s + b)
    neutral: dict[str, np.ndarray]  # column -> the feature values its occlusion uses
    metrics: dict
    version: str
    code_version: str = CODE_VERSION

    def __post_init__(self):
        self._features = _Features(self.columns)

    # --- scores
    @property
    def feature_columns(self) -> list[str]:
        return [c.name for c in self._features.columns]

    def _raw(self, x: np.ndarray) -> np.ndarray:
        s = self.hgb.decision_function(x)
        if self.linear is not None and self.blend > 0:
            enc, lr = self.linear
            s = (1 - self.blend) * s + self.blend * lr.decision_function(enc.transform(x))
        return s

    def _calibrated_logit(self, x: np.ndarray) -> np.ndarray:
        a, b = self.platt
        return a * self._raw(x) + b

    def _matrix(self, df: pd.DataFrame) -> tuple[np.ndarray, dict[str, pd.Series]]:
        clean = self._features.cleaned(df)
        return self._features.matrix(clean, len(df)), clean

    def missing_columns(self, df: pd.DataFrame) -> list[str]:
        """Feature columns the frame lacks (they are read as all missing)."""
        return [c for c in self.feature_columns if c not in df.columns]

    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        """Calibrated P(label = 1) per row (a 1-d array)."""
        x, _ = self._matrix(df)
        return _sigmoid(self._calibrated_logit(x))

    # --- reasons
    def _contributions(self, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated log-odds per row and each feature column's occlusion contribution (n x columns)."""
        cols = self._features.columns
        base = np.empty(len(x))
        contrib = np.zeros((len(x), len(cols)))
        active = [k for k, c in enumerate(cols) if c.name in self.neutral]
        for start in range(0, len(x), batch):
            xb = x[start:start + batch]
            m = len(xb)
            stacked = np.tile(xb, (len(active) + 1, 1))
            for r, k in enumerate(active, 1):
                stacked[r * m:(r + 1) * m, self._features.slices[cols[k].name]] = self.neutral[cols[k].name]
            z = self._calibrated_logit(stacked).reshape(len(active) + 1, m)
            base[start:start + m] = z[0]
            for r, k in enumerate(active, 1):
                contrib[start:start + m, k] = z[0] - z[r]
        return base, contrib

    def _describe(self, col: Column, raw: Any, value: np.ndarray) -> str:
        v = value[0]
        if col.role == "text":
            return f"{col.name} missing" if np.isnan(v) else f"{col.name} text"
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or np.isnan(v):
            if col.role == "categorical" and raw is not None and not (isinstance(raw, float) and math.isnan(raw)):
                return f"{col.name} = {raw} (unseen)"
            return f"{col.name} missing"
        if col.role == "categorical":
            code = int(v)
            if code == col.other_code:
                return f"{col.name} = {raw} ({'rare' if str(raw).casefold() not in col.index else 'other'})"
            return f"{col.name} = {col.levels[code]}"
        if col.role == "boolean":
            return f"{col.name} = {'Yes' if v == 1 else 'No'}"
        if col.role == "datetime":
            return f"{col.name} = {raw}"
        if any(v == f for f in col.frequent):
            return f"{col.name} = {_fmt(v)}"
        lo, hi = col.quantiles
        if v > hi:
            return f"{col.name} high"
        if v < lo:
            return f"{col.name} low"
        return f"{col.name} = {_fmt(v)}"

    @staticmethod
    def _text_word(col: Column, weights, row: int, sign: float) -> str | None:
        """The term of ``row`` (of the weighted TF-IDF matrix) that pushes most in the direction ``sign``."""
        lo, hi = weights.indptr[row], weights.indptr[row + 1]
        if lo == hi:
            return None
        w = weights.data[lo:hi] * sign
        k = int(np.argmax(w))
        if w[k] <= 0:
            return None
        vec, _ = col.text_model
        if getattr(col, "_terms", None) is None:
            col._terms = vec.get_feature_names_out()
        return str(col._terms[weights.indices[lo + k]])

    def explain(self, df: pd.DataFrame, n_reasons: int = 3) -> list[list[dict]]:
        """Per row, up to ``n_reasons`` positive then up to ``n_reasons`` negative contributions:
        ``{"column", "value", "contribution", "text"}`` (contribution in calibrated log-odds)."""
        return self._explain(df, n_reasons)[1]

    def _explain(self, df: pd.DataFrame, n_reasons: int) -> tuple[np.ndarray, list[list[dict]]]:
        x, clean = self._matrix(df)
        base, contrib = self._contributions(x)
        cols = self._features.columns
        weighted = {}  # text column -> TF-IDF x coefficient, rows of the frame (empty rows where missing)
        for col in cols:
            if col.role == "text":
                vec, lr = col.text_model
                weighted[col.name] = vec.transform(clean[col.name].fillna("").tolist()).multiply(lr.coef_[0]).tocsr()
        raws = {c.name: clean[c.name].tolist() for c in cols}
        out: list[list[dict]] = []
        for i in range(len(x)):
            row = contrib[i]
            order = np.argsort(-row, kind="stable")
            pos = [k for k in order[:n_reasons] if row[k] >= 0.01]
            neg = [k for k in order[::-1][:n_reasons] if row[k] <= -0.01]
            reasons = []
            for k in pos + neg:
                col = cols[k]
                raw = raws[col.name][i]
                value = x[i, self._features.slices[col.name]]
                label = self._describe(col, raw, value)
                if col.role == "text" and raw is not None:
                    word = self._text_word(col, weighted[col.name], i, np.sign(row[k]))
                    label = f'{col.name} mentions "{word}"' if word else f"{col.name} text"
                c = float(row[k])
                reasons.append({"column": col.name, "value": None if raw is None else
                                (raw if isinstance(raw, str) else _fmt(float(raw))),
                                "contribution": round(c, 3), "text": f"{label} ({c:+.2f})"})
            out.append(reasons)
        return _sigmoid(base), out

    def score(self, df: pd.DataFrame, id_column: str | None = None, n_reasons: int = 3) -> list[dict]:
        """``{"id", "score", "reasons"}`` per row: the calibrated probability (4 decimals) and readable
        reasons, e.g. ``"Lead Source = Reference (+0.21)"``. ``id`` comes from ``id_column`` (default: the
        training id column), else the row's position."""
        id_column = id_column or self.id_column
        ids = (df[id_column].tolist() if id_column and id_column in df.columns else list(range(len(df))))
        p, expl = self._explain(df, n_reasons)
        return [{"id": _jsonable(i), "score": round(float(s), 4), "reasons": [r["text"] for r in e]}
                for i, s, e in zip(ids, p, expl)]

    # --- persistence
    def metadata(self) -> dict:
        import sklearn

        return {"version": self.version, "code_version": self.code_version, "sklearn": sklearn.__version__,
                "label_column": self.label_column, "id_column": self.id_column, "metrics": self.metrics}

    def save(self, folder: Path | str) -> Path:
        """``folder/<version>.joblib`` plus ``<version>.json`` (metadata); returns the joblib path."""
        import joblib

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.version}.joblib"
        tmp = path.with_suffix(".joblib.tmp")
        joblib.dump({"code_version": self.code_version, "model": self}, tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(self.metadata(), indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: Path | str) -> "TabularModel":
        import joblib
        import sklearn

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file {path}")
        sidecar = path.with_suffix(".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        code = meta.get("code_version")
        if code is not None and code != CODE_VERSION:
            raise ModelVersionError(f"{path.name} was trained by tabular code version {code!r}; this code is "
                                    f"{CODE_VERSION!r}. Retrain the model (e.g. `orch leads train`).")
        saved_sk = meta.get("sklearn")
        if saved_sk and saved_sk.split(".")[:2] != sklearn.__version__.split(".")[:2]:
            raise ModelVersionError(f"{path.name} was saved with scikit-learn {saved_sk}; this environment has "
                                    f"{sklearn.__version__}. Retrain the model (e.g. `orch leads train`).")
        try:
            d = joblib.load(path)
        except Exception as exc:  # pickles of other code versions fail in many ways
            raise ModelVersionError(f"{path.name} could not be loaded ({type(exc).__name__}: {exc}); it was "
                                    f"probably written by another code version. Retrain the model.") from exc
        if not isinstance(d, dict) or d.get("code_version") != CODE_VERSION or not isinstance(d.get("model"), cls):
            found = d.get("code_version") if isinstance(d, dict) else type(d).__name__
            raise ModelVersionError(f"{path.name} holds tabular code version {found!r}, not {CODE_VERSION!r}. "
                                    f"Retrain the model (e.g. `orch leads train`).")
        model = d["model"]
        model._features = _Features(model.columns)
        return model


def latest_model(folder: Path | str) -> Path:
    """The newest ``*.joblib`` model in ``folder`` (or ``folder`` itself when it is a file)."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    found = sorted(folder.glob("*.joblib"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no model (*.joblib) in {folder}")
    return found[-1]


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# ------------------------------------------------------------------------------------------ training


def infer_schema(df: pd.DataFrame, label_column: str, *, id_column: str | None = None,
                 exclude_columns: Iterable[str] = ()) -> tuple[list[Column], dict[str, pd.Series]]:
    """Each column's role (see the module docstring) and the cleaned text/categorical values."""
    excluded = set(exclude_columns)
    cols, cleaned = [], {}
    for name in df.columns:
        if name == label_column:
            cols.append(Column(name, "dropped", "label"))
        elif name == id_column:
            cols.append(Column(name, "id", "id column"))
        elif name in excluded:
            cols.append(Column(name, "dropped", "excluded"))
        else:
            col, s = _infer_column(name, df[name], len(df))
            cols.append(col)
            if s is not None:
                cleaned[name] = s
    for col in cols:
        if col.role == "categorical":
            _fit_levels(col, cleaned[col.name], len(df))
    return cols, cleaned


def train(df: pd.DataFrame, label_column: str, *, id_column: str | None = None, exclude_columns: Iterable[str] = (),
          seed: int = 0, name: str = "tabular", progress: Callable[[str], None] | None = None,
          search_budget_s: float | None = None) -> TabularModel:
    """Type the columns, search a few boosted-tree configurations by out-of-fold AUC, blend with a
    logistic regression if that helps, calibrate (Platt, out of fold), refit on all rows.
    Rows without a label are left out. ``progress`` receives one-line messages. No further configuration
    is tried once ``search_budget_s`` (default ``SEARCH_BUDGET_SECONDS``) have passed; 0 tries only the
    first (the usual winner), for quick runs."""
    with _threads(len(df)):
        return _train(df, label_column, id_column=id_column, exclude_columns=exclude_columns, seed=seed, name=name,
                      progress=progress, search_budget_s=search_budget_s)


def _train(df, label_column, *, id_column, exclude_columns, seed, name, progress, search_budget_s) -> TabularModel:
    from sklearn.model_selection import StratifiedKFold

    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    if label_column not in df.columns:
        raise TabularError(f"no label column {label_column!r}; the columns are: {', '.join(map(str, df.columns))}")
    if id_column is not None and id_column not in df.columns:
        raise TabularError(f"no id column {id_column!r}; the columns are: {', '.join(map(str, df.columns))}")
    exclude_columns = tuple(exclude_columns)
    unknown = [c for c in exclude_columns if c not in df.columns]
    if unknown:
        raise TabularError(f"excluded column(s) not in the data: {', '.join(unknown)}")
    y_all = parse_labels(df[label_column])
    labelled = ~np.isnan(y_all)
    df = df.loc[labelled].reset_index(drop=True)
    y = y_all[labelled].astype(int)
    n = len(y)
    if n == 0:
        raise TabularError("no labelled rows to train on")
    classes = np.bincount(y, minlength=2)
    if classes.min() < max(N_FOLDS * 2, 10):
        raise TabularError(f"the label needs both classes with at least {max(N_FOLDS * 2, 10)} rows each; found "
                           f"{int(classes[0])} negative and {int(classes[1])} positive")

    columns, _ = infer_schema(df, label_column, id_column=id_column, exclude_columns=exclude_columns)
    feats = _Features(columns)
    if feats.width == 0:
        raise TabularError("no usable feature column (all are ids, constant, empty or excluded)")
    if id_column is None:
        id_column = next((c.name for c in columns if c.role == "id"), None)
    roles = {c.name: c.role for c in columns}
    say(f"{n} rows, {len(feats.columns)} feature columns: " + ", ".join(
        f"{k} {sum(1 for r in roles.values() if r == k)}" for k in
        ("numeric", "boolean", "datetime", "categorical", "text", "id", "dropped")
        if any(r == k for r in roles.values())))
    clean = feats.cleaned(df)
    folds = list(StratifiedKFold(N_FOLDS, shuffle=True, random_state=seed).split(np.zeros(n), y))

    # text columns: out-of-fold scores for training, a model on all rows for scoring
    text_oof: dict[str, np.ndarray] = {}
    for col in feats.columns:
        if col.role != "text":
            continue
        s = clean[col.name]
        present = s.notna().to_numpy()
        oof = np.full(n, np.nan)
        texts = np.array(s.fillna("").tolist(), dtype=object)
        for tr, va in folds:
            tr, va = tr[present[tr]], va[present[va]]
            if len(np.unique(y[tr])) < 2 or len(va) == 0:
                continue
            try:
                m = _text_model(list(texts[tr]), y[tr], seed)
            except ValueError:  # no term reaches min_df
                continue
            oof[va] = _text_logit(m, list(texts[va]))
        try:
            col.text_model = _text_model(list(texts[present]), y[present], seed)
            text_oof[col.name] = oof
        except ValueError:
            col.role, col.why = "dropped", "text without repeated words"
    if any(c.role == "dropped" for c in feats.columns):
        feats = _Features(columns)
        roles = {c.name: c.role for c in columns}
    x = feats.matrix(clean, n, text_oof)
    for col in feats.columns:  # numeric descriptions: quartiles and very frequent values
        if col.role in ("numeric", "datetime"):
            v = x[:, feats.slices[col.name].start]
            f = v[~np.isnan(v)]
            if len(f):
                col.quantiles = (float(np.quantile(f, 0.25)), float(np.quantile(f, 0.75)))
                vals, cnt = np.unique(f, return_counts=True)
                col.frequent = [float(a) for a, c in zip(vals, cnt) if c >= 0.1 * len(f)]
    cat_mask = feats.categorical

    # boosted trees: configurations by out-of-fold AUC
    from sklearn.metrics import roc_auc_score

    def oof_hgb(config: dict) -> tuple[np.ndarray, list[int]]:
        pred, iters = np.zeros(n), []
        for tr, va in folds:
            m = _hgb({**config, "categorical_features": cat_mask}, seed).fit(x[tr], y[tr])
            pred[va] = m.decision_function(x[va])
            iters.append(int(m.n_iter_))
        return pred, iters

    budget = SEARCH_BUDGET_SECONDS if search_budget_s is None else search_budget_s
    tried = []
    best = None
    for i, config in enumerate(CONFIGS):
        if i and time.perf_counter() - t0 >= budget:
            say(f"search budget {budget:.0f} s reached after {i} configuration(s)")
            break
        t1 = time.perf_counter()
        pred, iters = oof_hgb(config)
        auc = float(roc_auc_score(y, pred))
        tried.append({"config": config, "oof_auc": round(auc, 4), "trees": int(np.median(iters)),
                      "seconds": round(time.perf_counter() - t1, 2)})
        say(f"config {i + 1}/{len(CONFIGS)} {config}: out-of-fold AUC {auc:.4f}, {int(np.median(iters))} trees, "
            f"{time.perf_counter() - t1:.1f} s")
        if best is None or auc > best[0] + 1e-6:
            best = (auc, config, pred, iters)
    hgb_auc, config, hgb_oof, iters = best

    # logistic regression on the same features; blend weight by out-of-fold AUC
    text_score_cols = [feats.slices[c.name].start for c in feats.columns if c.role == "text"]
    lr_oof = np.zeros(n)
    for tr, va in folds:
        enc = _LinearEncoder().fit(x[tr], cat_mask, text_score_cols)
        lr_oof[va] = _lr(seed).fit(enc.transform(x[tr]), y[tr]).decision_function(enc.transform(x[va]))
    lr_auc = float(roc_auc_score(y, lr_oof))
    blend, blend_auc = 0.0, hgb_auc
    for w in (0.1, 0.2, 0.3, 0.4, 0.5):
        a = float(roc_auc_score(y, (1 - w) * hgb_oof + w * lr_oof))
        if a > blend_auc + 0.0005:
            blend, blend_auc = w, a
    oof = (1 - blend) * hgb_oof + blend * lr_oof
    say(f"logistic regression out-of-fold AUC {lr_auc:.4f}; blend weight {blend} -> AUC {blend_auc:.4f}")

    # Platt scaling on the out-of-fold scores
    from sklearn.linear_model import LogisticRegression

    platt_lr = LogisticRegression(C=1e6, max_iter=1000).fit(oof.reshape(-1, 1), y)
    platt = (float(platt_lr.coef_[0][0]), float(platt_lr.intercept_[0]))
    p_oof = _sigmoid(platt[0] * oof + platt[1])

    # refit on all rows
    trees = max(10, int(np.median(iters) * 1.1))
    hgb = _hgb({**config, "categorical_features": cat_mask}, seed, max_iter=trees, early=False).fit(x, y)
    linear = None
    if blend > 0:
        enc = _LinearEncoder().fit(x, cat_mask, text_score_cols)
        linear = (enc, _lr(seed).fit(enc.transform(x), y))

    validation = binary_metrics(y, p_oof)
    model = TabularModel(columns=columns, label_column=label_column, id_column=id_column, hgb=hgb, linear=linear,
                         blend=blend, platt=platt, neutral={}, metrics={}, version="")
    # neutral values from the out-of-fold text scores: distributed as a new row's text score is
    model.neutral = _neutral_values(model, feats, x, seed)
    h = data_hash(df)
    ident = hashlib.sha256(json.dumps([CODE_VERSION, h, label_column, id_column, sorted(exclude_columns), seed],
                                      default=str).encode()).hexdigest()[:12]
    model.version = f"{name}-{ident}"
    model.metrics = {
        "version": model.version, "code_version": CODE_VERSION, "train_data_hash": h, "seed": seed,
        "n_train": n, "positive_rate": round(float(y.mean()), 4), "train_seconds": round(time.perf_counter() - t0, 2),
        "validation": {**validation, "method": f"{N_FOLDS}-fold out-of-fold"},
        "calibration": calibration_error(y, p_oof) | {"platt": [round(platt[0], 4), round(platt[1], 4)]},
        "model": {"config": config, "trees": trees, "search": tried, "hgb_oof_auc": round(hgb_auc, 4),
                  "lr_oof_auc": round(lr_auc, 4), "blend_weight": blend},
        "columns": {c.name: c.role for c in columns},
        "dropped": {c.name: c.why for c in columns if c.role in ("dropped", "id")},
        "excluded": list(exclude_columns), "label_column": label_column, "id_column": id_column,
    }
    say(f"trained {model.version} in {model.metrics['train_seconds']} s: out-of-fold AUC {validation['auc']}, "
        f"Brier {validation['brier']}")
    return model


def _neutral_values(model: TabularModel, feats: _Features, x: np.ndarray, seed: int, sample: int = 400) -> dict:
    """Per column, the candidate value whose substitution changes the mean training log-odds least.
    Columns whose substitution never changes a score are left out (no reason, no cost)."""
    rng = np.random.default_rng(seed)
    xs = x[rng.choice(len(x), size=min(sample, len(x)), replace=False)]
    base = model._calibrated_logit(xs)
    out = {}
    for col in feats.columns:
        sl = feats.slices[col.name]
        v = x[:, sl]
        cands: list[np.ndarray] = [np.full(col.width, np.nan)]
        if col.role in ("categorical", "boolean"):
            vals, cnt = np.unique(v[~np.isnan(v[:, 0]), 0], return_counts=True)
            cands += [np.array([a]) for a in vals[np.argsort(-cnt)][:6]]
        elif col.role in ("numeric", "datetime"):
            f = v[~np.isnan(v[:, 0]), 0]
            if len(f):
                cands += [np.array([q]) for q in np.unique(np.quantile(f, [0.1, 0.25, 0.5, 0.75, 0.9]))]
        elif col.role == "text":
            ok = ~np.isnan(v[:, 0])
            if ok.any():
                rows = v[ok]
                order = np.argsort(rows[:, 0])
                cands += [rows[order[int(q * (len(order) - 1))]] for q in (0.25, 0.5, 0.75)]
        stacked = np.tile(xs, (len(cands), 1))
        for r, c in enumerate(cands):
            stacked[r * len(xs):(r + 1) * len(xs), sl] = c
        z = model._calibrated_logit(stacked).reshape(len(cands), len(xs))
        if np.abs(z - base).max() < 1e-6:
            continue
        shift = np.abs((z - base).mean(axis=1))
        out[col.name] = cands[int(np.argmin(shift))]
    return out


def evaluate(model: TabularModel, df: pd.DataFrame, label_column: str) -> dict:
    """``{"n", "auc", "accuracy", "log_loss", "brier", "lift_top_decile"}`` on labelled rows of ``df``."""
    if label_column not in df.columns:
        raise TabularError(f"no label column {label_column!r}; the columns are: {', '.join(map(str, df.columns))}")
    y = parse_labels(df[label_column])
    keep = ~np.isnan(y)
    if not keep.any():
        raise TabularError("no labelled rows to evaluate on")
    p = model.predict_proba(df.loc[keep].reset_index(drop=True))
    return binary_metrics(y[keep].astype(int), p)


def read_table(path: Path | str) -> pd.DataFrame:
    """A CSV, or JSON lines for ``.jsonl``/``.ndjson``/``.json``; everything read as found (no NA guessing
    beyond empty cells, so placeholder handling stays in one place)."""
    path = Path(path)
    suffix = path.suffix.casefold()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False)
