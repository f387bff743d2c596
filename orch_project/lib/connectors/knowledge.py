"""The knowledge base: shipped markdown articles with YAML front matter, and retrieval over them.

Retrieval is TF-IDF cosine similarity over title + body, with a boost for articles whose front
matter lists the item's predicted intent, so a confident triage lands on its article and an
unusual message can still find a better match by content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

_FRONT = re.compile(r"^---\n(.*?)\n---\n(.*)$", re.S)
INTENT_BOOST = 0.5


@dataclass(frozen=True)
class Article:
    id: str
    title: str
    queue: str
    intents: tuple[str, ...]
    summary: str
    steps: tuple[str, ...]
    body: str

    @classmethod
    def from_markdown(cls, text: str, source: str) -> "Article":
        m = _FRONT.match(text)
        if not m:
            raise ValueError(f"{source}: missing YAML front matter")
        meta = yaml.safe_load(m.group(1)) or {}
        body = m.group(2).strip()
        for key in ("id", "title", "intents"):
            if key not in meta:
                raise ValueError(f"{source}: front matter lacks {key!r}")
        summary = body.split("\n\n", 1)[0].strip()
        steps_block = re.search(r"## Steps\n(.*?)(?:\n## |\Z)", body, re.S)
        steps = tuple(
            re.sub(r"^\d+\.\s*", "", line).strip()
            for line in (steps_block.group(1).splitlines() if steps_block else [])
            if re.match(r"^\d+\.", line.strip())
        )
        return cls(str(meta["id"]), str(meta["title"]), str(meta.get("queue", "")),
                   tuple(meta["intents"]), summary, steps, body)


class KnowledgeBase:
    def __init__(self, articles: list[Article]):
        if not articles:
            raise ValueError("knowledge base is empty")
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.articles = articles
        self.by_id = {a.id: a for a in articles}
        self._vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english")
        docs = [f"{a.title}\n{a.title}\n{' '.join(i.replace('_', ' ') for i in a.intents)}\n{a.body}" for a in articles]
        self._matrix = self._vec.fit_transform(docs)
        self._intent_col = {i: n for n, a in enumerate(articles) for i in a.intents}

    @classmethod
    def load(cls, folder: Path) -> "KnowledgeBase":
        files = sorted(Path(folder).glob("*.md"))
        return cls([Article.from_markdown(p.read_text(encoding="utf-8"), p.name) for p in files])

    def lookup(self, queries: list[str], intents: list[str | None]) -> list[tuple[str, float]]:
        """Best (article_id, similarity in [0, 1]) per query."""
        import numpy as np

        sims = (self._vec.transform(queries) @ self._matrix.T).toarray()
        boosted = sims.copy()
        for row, intent in enumerate(intents):
            col = self._intent_col.get(intent or "")
            if col is not None:
                boosted[row, col] += INTENT_BOOST
        best = boosted.argmax(axis=1)
        scores = np.clip(sims[np.arange(len(queries)), best], 0.0, 1.0)
        return [(self.articles[b].id, float(s)) for b, s in zip(best, scores)]
