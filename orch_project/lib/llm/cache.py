"""Answer caches in the app database, shared by every run, re-execution and backfill.

- exact: key = sha256(task, model, prompt version, masked input text, context); on by default.
- semantic (opt-in per task): the cosine similarity of character n-gram vectors of the masked
  input text against cached inputs of the same task, model and prompt version; a hit needs a
  similarity at or above the task's threshold. Only for tasks whose answer depends on the text
  alone (triage), never for drafts addressed to one customer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa

from ..contracts import LLMStepRequest
from ..store import Database, chunked, llm_cache

SEMANTIC_SCAN_LIMIT = 20_000  # newest cached inputs compared per task/model/prompt version


def cache_key(task: str, model: str, prompt_version: str, req: LLMStepRequest) -> str:
    blob = json.dumps([task, model, prompt_version, req.inputs.text, req.inputs.context], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def exact_get(db: Database, keys: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if not keys:
        return found
    with db.begin() as conn:
        for chunk in chunked(keys, 900):
            q = sa.select(llm_cache.c.key, llm_cache.c.output).where(llm_cache.c.key.in_(chunk))
            found.update({k: v for k, v in conn.execute(q).all()})
    return found


def _vectorizer():
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), n_features=2**18, alternate_sign=False,
                             norm="l2", lowercase=True)


def semantic_get(db: Database, *, task: str, models: list[str], prompt_version: str, texts: list[str],
                 threshold: float) -> list[tuple[dict[str, Any], float, str] | None]:
    """For each text, (output, similarity, model) of the most similar cached input at or above
    ``threshold``, or None."""
    if not texts:
        return []
    q = (sa.select(llm_cache.c.input_text, llm_cache.c.key, llm_cache.c.model)
         .where(llm_cache.c.task == task, llm_cache.c.model.in_(models),
                llm_cache.c.prompt_version == prompt_version, llm_cache.c.input_text.is_not(None))
         .order_by(llm_cache.c.created_at.desc()).limit(SEMANTIC_SCAN_LIMIT))
    with db.begin() as conn:
        rows = conn.execute(q).all()
    if not rows:
        return [None] * len(texts)
    vec = _vectorizer()
    sims = vec.transform(texts) @ vec.transform([r.input_text for r in rows]).T  # cosine: rows are l2-normalised
    sims = sims.tocsr()
    best: list[tuple[int, float] | None] = []
    for i in range(len(texts)):
        row = sims.getrow(i)
        if row.nnz == 0 or float(row.data.max()) < threshold:
            best.append(None)
        else:
            best.append((int(row.indices[row.data.argmax()]), float(row.data.max())))
    # only the answers that matched are read (a scan holds up to SEMANTIC_SCAN_LIMIT cached inputs)
    outputs = exact_get(db, sorted({rows[b[0]].key for b in best if b is not None}))
    return [None if b is None else (outputs[rows[b[0]].key], b[1], rows[b[0]].model) for b in best]


def put(db: Database, conn, rows: list[dict[str, Any]]) -> None:
    """Insert answers; the first answer for a key wins (concurrent runs never overwrite)."""
    db.insert_ignore(conn, llm_cache, rows, ["key"])
