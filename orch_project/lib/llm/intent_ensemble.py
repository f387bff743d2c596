"""The intent classifier behind the embedded triage model: CPU-only, no pretrained weights.

Text is normalised (lower case, contractions expanded, currency symbols and digits folded, Snowball
stems for the stemmed view) and turned into TF-IDF word 1-2-gram + character 2-5-gram features.
Three members score every intent:

- a one-hidden-layer ReLU network on the stemmed view (input and hidden dropout, label smoothing,
  Adam; numpy on sparse input), weight 2;
- a linear SVM on the unstemmed view, weight 1;
- logistic regression on the stemmed view, weight 1.

Each member's scores are standardised per text and the weighted mean is the ensemble's decision
score. On BANKING77 this gains about 1.4 points of test accuracy over the linear SVM alone (see
benchmarks/README.md for the measured figures).
"""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

_NEG = re.compile(r"\b(dont|cant|wont|didnt|doesnt|isnt|havent|hasnt|wasnt|arent|couldnt|wouldnt|shouldnt)\b")
_CONTRACTIONS = (("can't", "can not"), ("won't", "will not"), ("n't", " not"), ("'m", " am"), ("'re", " are"),
                 ("'ve", " have"), ("'ll", " will"), ("'d", " would"))
_NEG_FIX = {"dont": "do not", "cant": "can not", "wont": "will not"}
_DIGITS = re.compile(r"\d+")
_TOKENS = re.compile(r"\w+|[?!]")
MEMBERS = (("mlp", True, 2.0), ("svc", False, 1.0), ("lr", True, 1.0))  # (model, stemmed view, weight)


_STEMS: dict[str, str] = {}  # word -> stem; the vocabulary of support mail is small and repeats a lot


def _stem_words(words: list[str]) -> list[str]:
    missing = [w for w in set(words) if w not in _STEMS]
    if missing:
        import snowballstemmer

        if len(_STEMS) > 200_000:
            _STEMS.clear()
        _STEMS.update(zip(missing, snowballstemmer.stemmer("english").stemWords(missing)))
    return [_STEMS[w] for w in words]


def _stemmed(plain: str) -> str:
    return " ".join(_stem_words(_TOKENS.findall(plain)))


def _plain(text: str) -> str:
    t = text.lower().replace("\u2019", "'")
    for a, b in _CONTRACTIONS:
        t = t.replace(a, b)
    t = _NEG.sub(lambda m: _NEG_FIX.get(m.group(1), m.group(1)[:-2] + " not"), t)
    t = t.replace("£", " gbp ").replace("$", " usd ").replace("€", " eur ")
    return _DIGITS.sub(lambda m: " " + "0" * min(len(m.group()), 3) + " ", t)


def make_view():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    kw = dict(sublinear_tf=True, dtype=np.float32)
    return make_union(TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b|\?", **kw),
                      TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), **kw))


class SparseMLP:
    """ReLU network with one hidden layer on sparse input; Adam updates only the input-weight rows a
    batch touches."""

    def __init__(self, hidden=256, epochs=20, lr=4e-3, batch=256, p_in=0.5, p_hidden=0.5, smoothing=0.1, seed=0):
        self.hidden, self.epochs, self.lr, self.batch = hidden, epochs, lr, batch
        self.p_in, self.p_hidden, self.smoothing, self.seed = p_in, p_hidden, smoothing, seed

    def fit(self, X, y) -> "SparseMLP":
        rng = np.random.default_rng(self.seed)
        X = sp.csr_matrix(X, dtype=np.float32)
        n, d = X.shape
        k, H = int(y.max()) + 1, self.hidden
        P = [(rng.uniform(-1, 1, (d, H)) * np.sqrt(6 / (d + H)) * 8).astype(np.float32), np.zeros(H, np.float32),
             (rng.standard_normal((H, k)) * np.sqrt(0.5 / H)).astype(np.float32), np.zeros(k, np.float32)]
        M = [np.zeros_like(p) for p in P]
        V = [np.zeros_like(p) for p in P]
        Y = np.full((n, k), self.smoothing / k, np.float32)
        Y[np.arange(n), y] += 1 - self.smoothing
        b1, b2, t = 0.9, 0.999, 0
        steps = self.epochs * -(-n // self.batch)

        def adam(j, g, lr, rows=slice(None)):
            M[j][rows] = m = b1 * M[j][rows] + (1 - b1) * g
            V[j][rows] = v = b2 * V[j][rows] + (1 - b2) * g * g
            P[j][rows] = P[j][rows] - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)

        for _ in range(self.epochs):
            perm = rng.permutation(n)
            for i in range(0, n, self.batch):
                t += 1
                lr = self.lr * min(1.0, (steps - t + 1) / (0.5 * steps))  # flat, then linear decay
                idx = perm[i:i + self.batch]
                Xb = X[idx]
                cols = np.unique(Xb.indices)
                Xs = Xb[:, cols].tocsr()
                Xs.data *= (rng.random(Xs.data.shape) > self.p_in) / (1 - self.p_in)
                z = Xs @ P[0][cols] + P[1]
                mask = ((rng.random(z.shape) > self.p_hidden) / (1 - self.p_hidden)).astype(np.float32)
                h = np.maximum(z, 0) * mask
                o = h @ P[2] + P[3]
                o = np.exp(o - o.max(1, keepdims=True))
                o /= o.sum(1, keepdims=True)
                g = (o - Y[idx]) / len(idx)
                dh = (g @ P[2].T) * mask * (z > 0)
                adam(2, h.T @ g, lr)
                adam(3, g.sum(0), lr)
                adam(1, dh.sum(0), lr)
                adam(0, Xs.T @ dh, lr, cols)
        self.params = P
        return self

    def decision_function(self, X):
        W1, c1, W2, c2 = self.params
        return np.maximum(sp.csr_matrix(X, dtype=np.float32) @ W1 + c1, 0) @ W2 + c2


def _fit_member(kind: str, X, y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    model = {"mlp": SparseMLP, "svc": lambda: LinearSVC(C=0.5),
             "lr": lambda: LogisticRegression(C=20, max_iter=200, tol=1e-3)}[kind]()
    return model.fit(X, y)


def _standardise(s):
    return (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-9)


class IntentEnsemble:
    """fit(texts, labels) / decision_function(texts) / classes_, like a scikit-learn classifier."""

    def __init__(self, n_jobs: int = 2):
        self.n_jobs = n_jobs

    def _views(self, texts):
        plain = [_plain(t) for t in texts]
        return {True: [_stemmed(p) for p in plain], False: plain}

    def fit(self, texts, labels) -> "IntentEnsemble":
        from joblib import Parallel, delayed

        self.classes_, y = np.unique(np.asarray(labels), return_inverse=True)
        norm = self._views(list(texts))
        self.vectorisers = {stem: make_view() for stem in (True, False)}
        X = {stem: v.fit_transform(norm[stem]) for stem, v in self.vectorisers.items()}
        self.members = Parallel(n_jobs=self.n_jobs)(delayed(_fit_member)(kind, X[stem], y)
                                                    for kind, stem, _ in MEMBERS)
        return self

    def decision_function(self, texts):
        norm = self._views(list(texts))
        X = {stem: v.transform(norm[stem]) for stem, v in self.vectorisers.items()}
        total = sum(w for *_, w in MEMBERS)
        return sum(w * _standardise(np.asarray(m.decision_function(X[stem]), dtype=np.float64))
                   for m, (_, stem, w) in zip(self.members, MEMBERS)) / total
