"""The intent classifier behind the embedded triage model: CPU-only, no pretrained weights.

Text is normalised (lower case, contractions expanded, currency symbols and digits folded, Snowball
stems for the stemmed view) and turned into TF-IDF word 1-2-gram + character 2-5-gram features.
Four members score every intent:

- a one-hidden-layer ReLU network (input and hidden dropout, label smoothing, Adam; numpy on sparse
  input) on the stemmed view, weight 3, and a narrower second one on the unstemmed view, weight 1;
- a linear SVM on the unstemmed view, weight 1;
- logistic regression on the stemmed view, weight 1.

Training data rarely holds every intent equally often (BANKING77's train.csv: 35 to 187 examples per
intent), and a model fitted to it favours the frequent intents. The probabilistic members' logits are
therefore adjusted by the log of the training prior (logit adjustment, Menon et al. 2021), so every
intent is judged on its evidence alone. Each member's scores are then standardised per text and the
weighted mean is the ensemble's decision score. These choices were made on 5-fold cross-validation
of BANKING77's train.csv (balanced accuracy); benchmarks/README.md has the figures.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import scipy.sparse as sp

_NEG = re.compile(r"\b(dont|cant|wont|didnt|doesnt|isnt|havent|hasnt|wasnt|arent|couldnt|wouldnt|shouldnt)\b")
_CONTRACTIONS = (("can't", "can not"), ("won't", "will not"), ("n't", " not"), ("'m", " am"), ("'re", " are"),
                 ("'ve", " have"), ("'ll", " will"), ("'d", " would"))
_NEG_FIX = {"dont": "do not", "cant": "can not", "wont": "will not"}
_DIGITS = re.compile(r"\d+")
_TOKENS = re.compile(r"\w+|[?!]")
# (name, model, stemmed view, weight, logits adjusted by the training prior, model options); longest
# fits first, so two workers finish together
MEMBERS = (("mlp_stemmed", "mlp", True, 3.0, True, {}), ("mlp_plain", "mlp", False, 1.0, True, {"hidden": 128}),
           ("lr", "lr", True, 1.0, True, {}), ("svc", "svc", False, 1.0, False, {}))
# the members of model files from before v4 (registry versions a rollback may still serve)
_V3_MEMBERS = (("mlp", "mlp", True, 2.0, False, {}), ("svc", "svc", False, 1.0, False, {}),
               ("lr", "lr", True, 1.0, False, {}))


_STEMS: dict[str, str] = {}  # word -> stem; the vocabulary of customer mail is small and repeats a lot


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


@functools.lru_cache(maxsize=200_000)
def _word_grams(word: str) -> tuple[str, ...]:
    w = f" {word} "
    grams: list[str] = []
    for n in range(2, 6):
        grams.extend(w[i:i + n] for i in range(max(len(w) - n + 1, 1)))
        if len(w) <= n:  # a short word counts once
            break
    return tuple(grams)


def char_wb_grams(doc: str) -> list[str]:
    """scikit-learn's ``analyzer="char_wb"``, ``ngram_range=(2, 5)`` on lower-cased text (the same
    n-grams, in the same order), memoised per word: a word's n-grams do not depend on its neighbours."""
    out: list[str] = []
    for word in doc.lower().split():
        out.extend(_word_grams(word))
    return out


def make_view():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    kw = dict(sublinear_tf=True, dtype=np.float32)
    return make_union(TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b|\?", **kw),
                      TfidfVectorizer(analyzer=char_wb_grams, **kw))


class SparseMLP:
    """ReLU network with one hidden layer on sparse input; Adam updates only the input-weight rows a
    batch touches, gathering and scattering the weights and both moments of those rows together."""

    def __init__(self, hidden=256, epochs=12, lr=6e-3, batch=256, p_in=0.5, p_hidden=0.5, smoothing=0.1, seed=0):
        self.hidden, self.epochs, self.lr, self.batch = hidden, epochs, lr, batch
        self.p_in, self.p_hidden, self.smoothing, self.seed = p_in, p_hidden, smoothing, seed

    def fit(self, X, y) -> "SparseMLP":
        rng = np.random.default_rng(self.seed)
        X = sp.csr_matrix(X, dtype=np.float32)
        n, d = X.shape
        k, H = int(y.max()) + 1, self.hidden
        rows = np.zeros((3, d, H), np.float32)  # input weights, their first and second Adam moments
        rows[0] = rng.uniform(-1, 1, (d, H)) * np.sqrt(6 / (d + H)) * 8
        dense = [np.zeros(H, np.float32), (rng.standard_normal((H, k)) * np.sqrt(0.5 / H)).astype(np.float32),
                 np.zeros(k, np.float32)]  # hidden bias, output weights, output bias
        moments = [(np.zeros_like(p), np.zeros_like(p)) for p in dense]
        Y = np.full((n, k), self.smoothing / k, np.float32)
        Y[np.arange(n), y] += 1 - self.smoothing
        b1, b2, t = 0.9, 0.999, 0
        steps = self.epochs * -(-n // self.batch)

        def adam(p, m, v, g, step, eps):  # in place; bias correction folded into step and eps
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            u = np.sqrt(v)
            u += eps
            np.divide(m, u, out=u)
            u *= step
            p -= u

        for _ in range(self.epochs):
            perm = rng.permutation(n)
            for i in range(0, n, self.batch):
                t += 1
                lr = self.lr * min(1.0, (steps - t + 1) / (0.5 * steps))  # flat, then linear decay
                step, eps = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t), 1e-8 * np.sqrt(1 - b2 ** t)
                idx = perm[i:i + self.batch]
                Xb = X[idx]
                cols = np.unique(Xb.indices)
                Xs = Xb[:, cols].tocsr()
                Xs.data *= (rng.random(Xs.data.shape) > self.p_in) / (1 - self.p_in)
                block = rows[:, cols]
                c1, W2, c2 = dense
                z = Xs @ block[0] + c1
                mask = ((rng.random(z.shape) > self.p_hidden) / (1 - self.p_hidden)).astype(np.float32)
                h = np.maximum(z, 0) * mask
                o = h @ W2 + c2
                o = np.exp(o - o.max(1, keepdims=True))
                o /= o.sum(1, keepdims=True)
                g = (o - Y[idx]) / len(idx)
                dh = (g @ W2.T) * mask * (z > 0)
                for p, (m, v), grad in zip(dense, moments, (dh.sum(0), h.T @ g, g.sum(0))):
                    adam(p, m, v, grad, step, eps)
                adam(*block, Xs.T @ dh, step, eps)
                rows[:, cols] = block
        self.params = [rows[0].copy(), *dense]
        return self

    def decision_function(self, X):
        W1, c1, W2, c2 = self.params
        return np.maximum(sp.csr_matrix(X, dtype=np.float32) @ W1 + c1, 0) @ W2 + c2


def _fit_member(kind: str, X, y, seed: int, options: dict):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    model = {"mlp": lambda: SparseMLP(seed=seed, **options), "svc": lambda: LinearSVC(C=0.5),
             "lr": lambda: LogisticRegression(C=20, max_iter=200, tol=1e-3)}[kind]()
    return model.fit(X, y)


def _standardise(s):
    return (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-9)


class IntentEnsemble:
    """fit(texts, labels) / decision_function(texts) / classes_, like a scikit-learn classifier."""

    def __init__(self, n_jobs: int = 2, seed: int = 0):
        self.n_jobs, self.seed = n_jobs, seed

    def _views(self, texts):
        plain = [_plain(t) for t in texts]
        return {True: [_stemmed(p) for p in plain], False: plain}

    def fit(self, texts, labels) -> "IntentEnsemble":
        from joblib import Parallel, delayed

        self.classes_, y = np.unique(np.asarray(labels), return_inverse=True)
        norm = self._views(list(texts))
        self.vectorisers = {stem: make_view() for stem in (True, False)}
        X = {stem: v.fit_transform(norm[stem]) for stem, v in self.vectorisers.items()}
        counts = np.bincount(y, minlength=len(self.classes_))
        self.log_prior_ = np.log(counts / counts.sum())
        self.spec_ = MEMBERS  # saved with the model: files keep scoring with the members they were fitted with
        first = self.seed * len(MEMBERS)
        self.members = Parallel(n_jobs=self.n_jobs)(delayed(_fit_member)(kind, X[stem], y, first + i, options)
                                                    for i, (_, kind, stem, _, _, options) in enumerate(MEMBERS))
        return self

    @property
    def _spec(self):
        # files saved before the spec was stored: v3 had three members and no prior adjustment
        return getattr(self, "spec_", None) or (MEMBERS if hasattr(self, "log_prior_") else _V3_MEMBERS)

    def member_scores(self, texts) -> dict[str, np.ndarray]:
        """Each member's standardised scores, by member name."""
        norm = self._views(list(texts))
        X = {stem: v.transform(norm[stem]) for stem, v in self.vectorisers.items()}
        out = {}
        for m, (name, _, stem, _, adjusted, _) in zip(self.members, self._spec):
            s = np.asarray(m.decision_function(X[stem]), dtype=np.float64)
            if s.ndim == 1:  # a two-class linear model scores class 1 against class 0: logits (0, s)
                s = np.column_stack([np.zeros_like(s), s])  # (standardised, each member then votes +-1)
            out[name] = _standardise(s - self.log_prior_ if adjusted else s)
        return out

    def decision_function(self, texts):
        scores = self.member_scores(texts)
        return sum(w * scores[name] for name, _, _, w, *_ in self._spec) / sum(m[3] for m in self._spec)
