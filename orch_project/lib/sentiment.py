"""Sentiment of short social posts (negative / neutral / positive), offline, on the CPU.

A multinomial logistic regression (``class_weight='balanced'``, so the rarer negative class is not starved)
over three blocks of features:

- TF-IDF of word 1-2 grams of the normalised post, with negation marking (``good`` after ``not`` becomes
  ``good_NEG`` until the next punctuation);
- TF-IDF of character 2-5 grams within words (spelling variants, elongations, hashtags);
- 43 dense lexicon and style features, standardised and weighted by ``lex_w``: VADER (its rule-adjusted
  token valences, compound per sentence), AFINN, TextBlob's pattern lexicon (polarity, subjectivity),
  emoticons and emoji, exclamation and question marks, capitals, elongations, first and second person,
  times and days (announcements are mostly neutral).

Normalisation: escaped unicode and HTML entities decoded, URLs -> ``http``, user names -> ``@user``,
emoticons -> ``EMOPOS`` / ``EMONEG``, emoji -> their names, letters repeated three times or more cut to two,
hashtags split into words (camel case, or ``wordsegment``). The lexicons ship inside their wheels (no
download at run time).

Hyperparameters (``C`` = 0.2, ``lex_w`` = 0.35) were chosen by nested cross-validation on the 2,000 labelled
dev tweets of TweetEval (SemEval-2017 4A): the inner 5-fold CV picked them in most of 30 outer folds;
``benchmarks/sentiment.py`` re-measures the figure. ``score`` is the model's probability of the label it
gives (balanced class weights: read it as a confidence, not a base rate).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

LABELS = ("negative", "neutral", "positive")
CODE_VERSION = "sentiment-lr-tfidf-lex-v1"
C_DEFAULT = 0.2
LEX_W_DEFAULT = 0.35

_U_ESC = re.compile(r"\\u([0-9a-fA-F]{4})")
_URL = re.compile(r"(https?://\S+|www\.\S+)")
_USER = re.compile(r"@\w+")
_ELONG = re.compile(r"([a-zA-Z])\1{2,}")
_HASH = re.compile(r"#(\w+)")
_EMO_POS = re.compile(r"(?<!\w)(?::|;|=|8)-?(?:\)|D|P|p|\]|\*|3)(?!\w)|<3|\^_?\^|\(:")
_EMO_NEG = re.compile(r"(?<!\w)(?::|;|=)'?-?(?:\(|\[|/|\\|\||S|@)(?![\w/])|D:|>:\(|\):|:'\(")
_TOK = re.compile(r"[A-Za-z0-9_]+(?:'[a-z]+)?|[!?]+|[^\sA-Za-z0-9_]")
_SENT = re.compile(r"(?<=[.!?])\s+")
_AFTOK = re.compile(r"[a-z0-9']+|[^\sa-z0-9']+")
_WORD = re.compile(r"[A-Za-z']+")
_DAYS = re.compile(r"\b(tomorrow|tonight|today|monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b")
_TIME = re.compile(r"\b\d{1,2}(:\d\d)?\s?(am|pm)\b|\b\d{1,2}:\d\d\b")
NEGATORS = frozenset(
    "not no never none nobody nothing neither nor nowhere cannot can't don't doesn't didn't isn't aren't wasn't "
    "weren't won't wouldn't shouldn't couldn't hasn't haven't hadn't ain't dont doesnt didnt isnt arent wasnt "
    "werent wont wouldnt shouldnt couldnt hasnt havent hadnt aint cant".split())
FIRST_PERSON = frozenset("i me my mine myself im i'm i've ive i'll ill i'd id we us our ours".split())
SECOND_PERSON = frozenset("you u your ur yours you're youre ya y'all yall".split())


# --- normalisation ----------------------------------------------------------------------------------

@lru_cache(maxsize=20_000)
def split_hashtag(tag: str) -> str:
    if re.search(r"[a-z][A-Z]", tag):
        return " ".join(re.sub(r"([a-z])([A-Z])", r"\1 \2", tag).lower().split())
    if len(tag) > 3 and tag.isalpha():
        import wordsegment

        _wordsegment_loaded()
        return " ".join(wordsegment.segment(tag.lower()))
    return tag.lower()


@lru_cache(maxsize=1)
def _wordsegment_loaded() -> bool:
    import wordsegment

    wordsegment.load()
    return True


def clean(text: str) -> str:
    t = _U_ESC.sub(lambda m: chr(int(m.group(1), 16)), text or "")
    t = html.unescape(t.replace('\\"', '"').replace('""', '"'))
    return _USER.sub("@user", _URL.sub(" http ", t)).strip().strip('"').strip()


def normalise(text: str) -> str:
    import emoji

    t = clean(text)
    t = _EMO_NEG.sub(" EMONEG ", _EMO_POS.sub(" EMOPOS ", t))
    t = emoji.demojize(t, delimiters=(" EMJ", " "))
    t = _ELONG.sub(r"\1\1", t)
    t = _HASH.sub(lambda m: " HASH " + split_hashtag(m.group(1)) + " ", t)
    return t.replace("\u2019", "'").replace("\u2018", "'")


def word_tokens(text: str) -> list[str]:
    """Word 1-2 grams with negation marking (the word analyzer of the TF-IDF block)."""
    out, negated = [], False
    for w in _TOK.findall(text.lower()):
        if w[0] in ".,;:!?":
            negated = False
            out.append(w)
        elif w in NEGATORS:
            negated = True
            out.append(w)
        else:
            out.append(w + "_NEG" if negated else w)
    return out + [a + " " + b for a, b in zip(out, out[1:])]


# --- dense lexicon and style features -------------------------------------------------------------------

class _Lexicons:
    """VADER (keeping its rule-adjusted per-token valences), AFINN's word list and TextBlob's pattern lexicon,
    built once per process."""

    def __init__(self):
        from afinn import Afinn
        from textblob.en.sentiments import PatternAnalyzer
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        class Vader(SentimentIntensityAnalyzer):
            def score_valence(self, sentiments, text):
                self.last = list(sentiments)
                return super().score_valence(sentiments, text)

        self.vader = Vader()
        self.afinn = Afinn(emoticons=True)._dict  # phrase -> score (a lookup is much faster than its regex)
        self.afinn_max = max(len(k.split()) for k in self.afinn)
        self.pattern = PatternAnalyzer()


@lru_cache(maxsize=1)
def lexicons() -> _Lexicons:
    return _Lexicons()


def _vader_text(c: str, lex: _Lexicons) -> str:
    c = _HASH.sub(lambda m: split_hashtag(m.group(1)), c)

    def shorten(w: str) -> str:
        if not _ELONG.search(w):
            return w
        once = _ELONG.sub(r"\1", w)
        return once if once.lower() in lex.vader.lexicon else _ELONG.sub(r"\1\1", w)
    return " ".join(shorten(w) for w in c.split(" "))


def _afinn_scores(t: str, lex: _Lexicons) -> list[float]:
    toks, out, i = _AFTOK.findall(t.lower()), [], 0
    while i < len(toks):
        for n in range(min(lex.afinn_max, len(toks) - i), 0, -1):
            s = lex.afinn.get(" ".join(toks[i:i + n]))
            if s is not None:
                out.append(s)
                i += n
                break
        else:
            i += 1
    return out


def dense_features(text: str) -> list[float]:
    import emoji
    import numpy as np

    lex = lexicons()
    c = clean(text)
    t = _vader_text(c, lex)
    low = c.lower()
    whole = lex.vader.polarity_scores(c)["compound"]
    s = lex.vader.polarity_scores(t)
    val = np.array([x for x in lex.vader.last if x != 0] or [0.0])
    f = [whole, s["neg"], s["neu"], s["pos"], s["compound"], val[val > 0].sum(), val[val < 0].sum(), val.max(),
         val.min(), (val > 0).sum(), (val < 0).sum(), val[-1], val[0]]
    sents = [x for x in _SENT.split(t) if x.strip()]
    per = [lex.vader.polarity_scores(x)["compound"] for x in sents] if len(sents) > 1 else [s["compound"]]
    f += [max(per), min(per), per[-1]]
    a = _afinn_scores(t, lex) or [0.0]
    f += [sum(a), max(a), min(a)]
    polarity, subjectivity = lex.pattern.analyze(t)
    f += [polarity, subjectivity]
    f += [sum(1 for ch in c if emoji.is_emoji(ch)), 0.0, len(_EMO_POS.findall(c)), len(_EMO_NEG.findall(c))]
    words = _WORD.findall(c)
    lw = [w.lower() for w in words]
    n = max(len(words), 1)
    f += [c.count("!"), c.count("?"), int(bool(_ELONG.search(c))),
          sum(1 for w in c.split() if len(w) > 2 and w.isupper()), math.log1p(len(c.split()))]
    f += [int(bool(re.search(r"(\.\.\.|\u2026)\s*$", c))), int("http" in c), c.count("#"), int(c.startswith("@user")),
          c.count("@user"), sum(w in FIRST_PERSON for w in lw) / n, sum(w in SECOND_PERSON for w in lw) / n,
          sum(1 for w in words[1:] if w[:1].isupper() and not w.isupper()) / n, len(re.findall(r"\d+", c)),
          int(bool(_TIME.search(low))), int(bool(_DAYS.search(low))), int(c.rstrip().endswith("?")),
          int(":" in c and not re.search(r"\d:\d", c))]
    return f


def featurise(texts: Sequence[str]):
    """(normalised texts, dense feature matrix) of ``texts``: the per-post transforms, nothing fitted."""
    import numpy as np

    return [normalise(t) for t in texts], np.array([dense_features(t) for t in texts], dtype=float)


# --- the model ------------------------------------------------------------------------------------------

@dataclass
class SentimentModel:
    C: float = C_DEFAULT
    lex_w: float = LEX_W_DEFAULT
    version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    parts: Any = None
    clf: Any = None

    def _matrix(self, norm: Sequence[str], dense, fit: bool = False):
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import StandardScaler

        if fit:
            self.parts = (TfidfVectorizer(analyzer=word_tokens, sublinear_tf=True),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
                          StandardScaler())
            words, chars, scale = (p.fit_transform(x) for p, x in zip(self.parts, (norm, norm, dense)))
        else:
            words, chars, scale = (p.transform(x) for p, x in zip(self.parts, (norm, norm, dense)))
        return sp.hstack([words, chars, sp.csr_matrix(scale * self.lex_w)]).tocsr()

    def fit_features(self, norm: Sequence[str], dense, y) -> "SentimentModel":
        from sklearn.linear_model import LogisticRegression

        self.clf = LogisticRegression(C=self.C, class_weight="balanced", max_iter=3000)
        self.clf.fit(self._matrix(norm, dense, fit=True), y)
        return self

    def predict_features(self, norm: Sequence[str], dense):
        """(label indices, probability of each label given) for featurised posts."""
        p = self.clf.predict_proba(self._matrix(norm, dense))
        return p.argmax(axis=1), p.max(axis=1)

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """``{"label", "score"}`` per post (an empty post is neutral with score 1)."""
        texts = list(texts)
        idx = [i for i, t in enumerate(texts) if t and t.strip()]
        out: list[dict[str, Any]] = [{"label": "neutral", "score": 1.0} for _ in texts]
        if idx:
            labels, scores = self.predict_features(*featurise([texts[i] for i in idx]))
            for i, lab, sc in zip(idx, labels, scores):
                out[i] = {"label": LABELS[int(lab)], "score": round(float(sc), 4)}
        return out

    def save(self, folder: Path | str) -> Path:
        import joblib
        import sklearn

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.version}.joblib"
        tmp = path.with_suffix(".tmp")
        joblib.dump({"code_version": CODE_VERSION, "sklearn": sklearn.__version__, "model": self}, tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps({"version": self.version, "code_version": CODE_VERSION,
                                                         "metrics": self.metrics}, indent=2))
        return path

    @classmethod
    def load(cls, path: Path | str) -> "SentimentModel":
        import joblib
        import sklearn

        d = joblib.load(path)
        if not isinstance(d, dict) or d.get("code_version") != CODE_VERSION or \
                str(d.get("sklearn", "")).split(".")[:2] != sklearn.__version__.split(".")[:2]:
            raise ValueError(f"{Path(path).name} was written by another code or scikit-learn version; retrain it")
        return d["model"]


def label_ids(labels: Sequence[str | int]) -> list[int]:
    """Labels as indices into LABELS: names (any case) or the TweetEval ids 0/1/2."""
    out = []
    for lab in labels:
        s = str(lab).strip().lower()
        if s in LABELS:
            out.append(LABELS.index(s))
        elif s in ("0", "1", "2"):
            out.append(int(s))
        else:
            raise ValueError(f"label {lab!r} is not one of {', '.join(LABELS)} (or 0/1/2)")
    return out


def train(texts: Sequence[str], labels: Sequence[str | int], *, C: float = C_DEFAULT,
          lex_w: float = LEX_W_DEFAULT) -> SentimentModel:
    import numpy as np

    y = np.array(label_ids(labels))
    if len(set(y.tolist())) < 3:
        raise ValueError("training needs examples of all three labels")
    norm, dense = featurise(texts)
    model = SentimentModel(C=C, lex_w=lex_w).fit_features(norm, dense, y)
    digest = hashlib.sha256(json.dumps([CODE_VERSION, C, lex_w, list(texts), y.tolist()]).encode()).hexdigest()[:12]
    model.version = f"sentiment-{digest}"
    model.metrics = {"n_train": len(texts), "C": C, "lex_w": lex_w,
                     "label_counts": {LABELS[k]: int((y == k).sum()) for k in range(3)}}
    return model


def macro_recall(y_true, y_pred) -> float:
    from sklearn.metrics import recall_score

    return float(recall_score(y_true, y_pred, average="macro", labels=[0, 1, 2]))
