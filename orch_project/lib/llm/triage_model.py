"""The embedded intent model: TF-IDF word and character n-grams with a linear SVM, trained on
CPU in seconds. Confidence is a softmax over the SVM's decision scores (temperature fixed at
training time), good enough to rank and to gate low-confidence items for human review.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CODE_VERSION = "tfidf-wc-linsvc-v1"
SOFTMAX_TEMPERATURE = 0.15


@dataclass
class TriageModel:
    pipeline: Any
    version: str
    labels: list[str]
    metrics: dict[str, Any]

    def predict(self, texts: list[str]) -> tuple[list[str], list[float]]:
        import numpy as np

        if not texts:
            return [], []
        scores = self.pipeline.decision_function(texts)
        z = (scores - scores.max(axis=1, keepdims=True)) / SOFTMAX_TEMPERATURE
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        classes = self.pipeline.classes_
        return [str(classes[i]) for i in best], [float(p) for p in probs[np.arange(len(texts)), best]]

    def save(self, folder: Path) -> Path:
        import joblib

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"triage-{self.version}.joblib"
        tmp = path.with_suffix(".tmp")
        joblib.dump({"pipeline": self.pipeline, "version": self.version, "labels": self.labels,
                     "metrics": self.metrics}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "TriageModel":
        import joblib

        d = joblib.load(path)
        return cls(d["pipeline"], d["version"], d["labels"], d["metrics"])


def data_hash(texts: list[str], labels: list[str]) -> str:
    h = hashlib.sha256()
    for t, y in zip(texts, labels):
        h.update(t.encode())
        h.update(b"\x1f")
        h.update(y.encode())
        h.update(b"\x1e")
    return h.hexdigest()


def train(texts: list[str], labels: list[str], *, validation_share: float = 0.1, seed: int = 0) -> TriageModel:
    """Fit on ``texts``; report accuracy on a stratified validation split of the same data."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    def build():
        return make_pipeline(
            make_union(
                TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
            ),
            LinearSVC(C=0.5),
        )

    x_tr, x_va, y_tr, y_va = train_test_split(texts, labels, test_size=validation_share, random_state=seed,
                                              stratify=labels)
    probe = build().fit(x_tr, y_tr)
    val_acc = float((probe.predict(x_va) == __import__("numpy").array(y_va)).mean())
    pipeline = build().fit(texts, labels)  # final model sees all training data
    version = hashlib.sha256(f"{CODE_VERSION}:{data_hash(texts, labels)}".encode()).hexdigest()[:12]
    return TriageModel(pipeline, version, sorted(set(labels)), {
        "validation_accuracy": round(val_acc, 4), "n_train": len(texts), "n_labels": len(set(labels)),
        "code_version": CODE_VERSION, "train_data_hash": data_hash(texts, labels),
    })


def evaluate(model: TriageModel, texts: list[str], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred, _ = model.predict(texts)
    return {"n": len(texts), "accuracy": round(float(accuracy_score(labels, pred)), 4),
            "macro_f1": round(float(f1_score(labels, pred, average="macro")), 4)}


def metrics_json(m: dict[str, Any]) -> str:
    return json.dumps(m, sort_keys=True)
