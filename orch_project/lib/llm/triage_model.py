"""The embedded intent model, trained on CPU in seconds from labelled text (BANKING77 by default,
or anyone's own tickets through `orch triage train`).

Training holds out a stratified validation split of the training data. A classifier fitted on the
rest is scored on it: the validation split calibrates the confidence (a softmax over decision scores
with a temperature fitted by log-loss) and the out-of-scope threshold, and gives the figures the
promotion gate reads. The classifier that is saved and served is then fitted again, with the same
settings, on every example (``refit``, on by default), so no labelled example is left unused;
it carries the calibration of the first fit, and its validation figures are those of the first fit
(an estimate for a classifier trained on less data). Test data is never touched here.

Out-of-scope: below the threshold the prediction is ``unknown`` (the item goes to a human). With
out-of-scope examples in the training data (``oos_label``) they are a class of their own, answered
as ``unknown``, and the threshold maximises validation accuracy with "unknown" counted correct for
them; without them
the threshold is the confidence at which a logistic fit of P(correct | confidence) on validation
reaches ``min_precision_below`` (0.5: reject only where the model is more likely wrong).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CODE_VERSION = "ensemble-2mlp-svc-lr-prior-adjusted-refit-v4"
DEFAULT_TEMPERATURE = 0.15  # used when no validation example has a label the classifier knows
REJECT_ALL = math.nextafter(1.0, 2.0)  # above every probability: everything goes to a human
UNKNOWN = "unknown"


@dataclass
class TriageModel:
    pipeline: Any
    version: str
    labels: list[str]
    metrics: dict[str, Any]
    temperature: float = DEFAULT_TEMPERATURE
    threshold: float = 0.0
    oos_class: str | None = None  # the classifier's class of out-of-scope examples, answered UNKNOWN

    def scores(self, texts: list[str]):
        import numpy as np

        return np.asarray(self.pipeline.decision_function(texts), dtype=np.float64)

    def probabilities(self, texts: list[str]):
        return softmax(self.scores(texts), self.temperature)

    def predict_top1(self, texts: list[str]) -> tuple[list[str], list[float]]:
        """The best class (``unknown`` when it is the out-of-scope class) and its probability."""
        import numpy as np

        if not texts:
            return [], []
        probs = self.probabilities(texts)
        best = probs.argmax(axis=1)
        names = [UNKNOWN if c == self.oos_class else str(c) for c in self.pipeline.classes_]
        return [names[i] for i in best], [float(p) for p in probs[np.arange(len(texts)), best]]

    def predict(self, texts: list[str]) -> tuple[list[str], list[float]]:
        """Labels with ``unknown`` below the out-of-scope threshold, and the confidence."""
        labels, confs = self.predict_top1(texts)
        return [lab if c >= self.threshold else UNKNOWN for lab, c in zip(labels, confs)], confs

    def save(self, folder: Path) -> Path:
        import joblib

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"triage-{self.version}.joblib"
        tmp = path.with_suffix(".tmp")
        joblib.dump({"pipeline": self.pipeline, "version": self.version, "labels": self.labels,
                     "metrics": self.metrics, "temperature": self.temperature, "threshold": self.threshold,
                     "oos_class": self.oos_class}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "TriageModel":
        import joblib

        d = joblib.load(path)
        return cls(d["pipeline"], d["version"], d["labels"], d["metrics"], d.get("temperature", DEFAULT_TEMPERATURE),
                   d.get("threshold", 0.0), d.get("oos_class"))


def softmax(scores, temperature: float):
    import numpy as np

    z = (scores - scores.max(axis=1, keepdims=True)) / temperature
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def data_hash(texts: list[str], labels: list[str]) -> str:
    h = hashlib.sha256()
    for t, y in zip(texts, labels):
        h.update(t.encode())
        h.update(b"\x1f")
        h.update(y.encode())
        h.update(b"\x1e")
    return h.hexdigest()


def build_estimator(seed: int = 0):
    """The classifier (lib/llm/intent_ensemble.py): two small networks, a linear SVM and logistic
    regression on TF-IDF word + character n-grams of normalised text, prior-adjusted scores averaged."""
    from .intent_ensemble import IntentEnsemble

    return IntentEnsemble(seed=seed)


def fit_temperature(scores, y_idx) -> float:
    """The softmax temperature minimising validation log-loss (a 1-D search)."""
    import numpy as np

    best_t, best_loss = 1.0, float("inf")
    for t in np.geomspace(0.05, 5.0, 60):  # below 0.05 probabilities saturate at 1.0
        p = softmax(scores, t)
        loss = -float(np.log(np.clip(p[np.arange(len(y_idx)), y_idx], 1e-12, 1)).mean())
        if loss < best_loss:
            best_t, best_loss = float(t), loss
    return best_t


def calibrate_threshold(conf, correct, oos_mask=None, *, min_precision_below: float = 0.5) -> float:
    """The out-of-scope threshold from validation confidences (see the module docstring). ``correct``:
    the top-1 answer was right (for an out-of-scope example: it was ``unknown``)."""
    import numpy as np

    if not 0.0 < min_precision_below < 1.0:
        raise ValueError("min_precision_below must lie strictly between 0 and 1")

    conf = np.asarray(conf)
    correct = np.asarray(correct, dtype=bool)
    candidates = np.unique(np.concatenate([[0.0], conf]))
    if oos_mask is not None and np.asarray(oos_mask).any():
        oos = np.asarray(oos_mask, dtype=bool)
        accs = [((conf >= t) & correct & ~oos).sum() + (((conf < t) | correct) & oos).sum() for t in candidates]
        return float(candidates[int(np.argmax(accs))])
    # no out-of-scope examples: reject where the model is more likely wrong than right, i.e. below the
    # confidence at which a logistic fit of P(correct | logit(confidence)) crosses min_precision_below
    # (two parameters: steadier on a few hundred examples than a step-wise fit)
    if correct.all() or not correct.any():
        return 0.0 if correct.all() else REJECT_ALL
    from sklearn.linear_model import LogisticRegression

    c = np.clip(conf, 1e-6, 1 - 1e-6)
    fit = LogisticRegression(C=1e6).fit(np.log(c / (1 - c))[:, None], correct)
    a, b = float(fit.intercept_[0]), float(fit.coef_[0, 0])
    target = np.log(min_precision_below / (1 - min_precision_below))
    if b <= 0:  # confidence says nothing about correctness: all or nothing by the overall rate
        return 0.0 if correct.mean() >= min_precision_below else REJECT_ALL
    return float(1 / (1 + np.exp(-(target - a) / b)))


def validation_share_for(n: int) -> float:
    """A tenth of large sets; more of small ones so calibration sees a few hundred examples."""
    return min(0.3, max(0.1, 400 / max(n, 1)))


def train(texts: list[str], labels: list[str], *, oos_label: str | None = None,
          validation_share: float | None = None, seed: int = 0, refit: bool = True) -> TriageModel:
    import numpy as np
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels) or not texts:
        raise ValueError("training needs the same, non-zero number of texts and labels")
    if validation_share is None:
        validation_share = validation_share_for(len(texts))
    y = np.array(labels, dtype=object)
    in_scope = y != oos_label if oos_label is not None else np.ones(len(y), dtype=bool)
    idx = np.arange(len(texts))
    counts = {lab: int((y == lab).sum()) for lab in set(labels)}
    n_va = math.ceil(len(texts) * validation_share)  # as train_test_split counts it
    # stratified when every label can appear on both sides of the split
    stratify = y if min(counts.values()) >= 2 and min(n_va, len(texts) - n_va) >= len(counts) else None
    tr, va = train_test_split(idx, test_size=validation_share, random_state=seed, stratify=stratify)
    if len(set(y[tr[in_scope[tr]]])) < 2:
        raise ValueError("training needs at least two in-scope labels")
    # out-of-scope examples, if any, are a class of their own
    pipeline = build_estimator(seed).fit([texts[i] for i in tr], y[tr].astype(str))
    classes = list(pipeline.classes_)
    scores = np.asarray(pipeline.decision_function([texts[i] for i in va]), dtype=np.float64)
    va_in = in_scope[va]
    known = np.array([lab in classes for lab in y[va]])
    y_idx = np.array([classes.index(lab) if k else 0 for lab, k in zip(y[va], known)])
    temperature = fit_temperature(scores[known], y_idx[known]) if known.any() else DEFAULT_TEMPERATURE
    probs = softmax(scores, temperature)
    top = probs.argmax(axis=1)
    conf = probs[np.arange(len(va)), top]
    pred = np.array([UNKNOWN if classes[i] == oos_label else classes[i] for i in top], dtype=object)
    gold = np.where(va_in, y[va], UNKNOWN)
    correct = pred == gold
    threshold = calibrate_threshold(conf, correct, ~va_in if oos_label is not None else None)
    final = np.where(conf >= threshold, pred, UNKNOWN)
    top1 = float(correct[va_in].mean()) if va_in.any() else 0.0
    served_on = len(tr)
    if refit:
        pipeline = build_estimator(seed).fit(texts, y.astype(str))
        classes, served_on = list(pipeline.classes_), len(texts)
    oos_class = oos_label if oos_label in classes else None
    labels_served = [c for c in classes if c != oos_class]
    h = data_hash(texts, labels)
    version = hashlib.sha256(
        f"{CODE_VERSION}:{h}:{oos_label}:{seed}:{validation_share}:{refit}".encode()).hexdigest()[:12]
    metrics = {
        "validation_accuracy": round(top1, 4),
        "validation_accuracy_with_rejection": round(float((final == gold).mean()), 4),
        "validation_macro_f1": round(float(f1_score(gold.astype(str), final.astype(str), average="macro")), 4),
        "validation_coverage": round(float((conf >= threshold).mean()), 4),
        "oos_threshold": round(threshold, 6), "temperature": round(temperature, 6), "oos_label": oos_label,
        "n_train": int(len(tr)), "n_validation": int(len(va)), "n_served_fit": int(served_on),
        "n_labels": len(labels_served),
        "code_version": CODE_VERSION, "train_data_hash": h,
    }
    return TriageModel(pipeline, version, labels_served, metrics, temperature, threshold, oos_class)


def evaluate(model: TriageModel, texts: list[str], labels: list[str], oos_label: str | None = None) -> dict[str, Any]:
    """Served behaviour on labelled data: ``accuracy`` and ``macro_f1`` count an ``unknown`` answer as
    correct only for out-of-scope examples; ``in_scope_accuracy`` is over in-scope examples,
    ``oos_recall`` the share of out-of-scope examples answered ``unknown`` (None without them);
    ``top1_accuracy`` ignores the threshold; ``coverage`` is the share answered with a label."""
    import numpy as np
    from sklearn.metrics import f1_score

    if not texts:
        raise ValueError("no examples to evaluate")
    y = np.array(labels, dtype=object)
    oos = (y == oos_label) if oos_label is not None else np.zeros(len(y), dtype=bool)
    gold = np.where(oos, UNKNOWN, y)
    top, conf = model.predict_top1(list(texts))
    top = np.array(top, dtype=object)
    pred = np.where(np.array(conf) >= model.threshold, top, UNKNOWN)
    return {
        "n": int(len(y)),
        "accuracy": round(float((pred == gold).mean()), 4),
        "macro_f1": round(float(f1_score(gold.astype(str), pred.astype(str), average="macro")), 4),
        "in_scope_accuracy": round(float((pred[~oos] == gold[~oos]).mean()), 4) if (~oos).any() else None,
        "oos_recall": round(float((pred[oos] == UNKNOWN).mean()), 4) if oos.any() else None,
        "top1_accuracy": round(float((top[~oos] == gold[~oos]).mean()), 4) if (~oos).any() else None,
        "coverage": round(float((pred != UNKNOWN).mean()), 4),
    }
