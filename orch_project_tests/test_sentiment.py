"""Sentiment of social posts (lib/sentiment.py) and `orch marketing sentiment`: trained on TweetEval's dev
tweets from the data directory (mandatory in CI), held out honestly, the CLI's JSON lines."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from orch_project.lib import datasets, sentiment

from .conftest import dataset_missing


def _tweets():
    try:
        return datasets.read_tweets()
    except datasets.DatasetMissing as exc:
        dataset_missing(exc)


def test_held_out_macro_recall_and_normalisation():
    texts, labels = _tweets()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    train, test = order[:1500], order[1500:]
    model = sentiment.train([texts[i] for i in train], [labels[i] for i in train])
    pred = [sentiment.LABELS.index(p["label"]) for p in model.predict([texts[i] for i in test])]
    # a floor that catches a broken pipeline (the 30-fold figure on all 2,000 is 0.65, benchmarks/sentiment.py)
    assert sentiment.macro_recall(np.array([labels[i] for i in test]), np.array(pred)) >= 0.58
    assert sentiment.normalise("Sooooo happy :) #BestDayEver http://x.co @bob") == \
        "Soo happy  EMOPOS   HASH best day ever   http  @user"
    assert sentiment.word_tokens("not good. great")[:4] == ["not", "good_NEG", ".", "great"]
    assert model.predict(["", "   "]) == [{"label": "neutral", "score": 1.0}] * 2


def test_cli_labels_json_lines_and_plain_lines(tmp_path):
    _tweets()
    from orch_project.cli import main

    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": "p1", "text": "I love this, best purchase ever!"}\n'
                     '{"id": "p2", "text": "Worst service, my order never arrived and nobody answers"}\n')
    runner = CliRunner()
    res = runner.invoke(main, ["marketing", "sentiment", "--jsonl", str(posts), "--model-dir", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    out = [json.loads(x) for x in res.output.splitlines() if x.startswith("{")]
    assert [(o["id"], o["label"]) for o in out] == [("p1", "positive"), ("p2", "negative")]
    assert all(0 < o["score"] <= 1 for o in out)
    again = runner.invoke(main, ["marketing", "sentiment", "--model-dir", str(tmp_path / "m")],
                          input="The meeting is moved to Friday at 3pm\n")
    assert again.exit_code == 0 and "training" not in again.output  # the kept model serves
    assert json.loads(again.output.strip().splitlines()[-1])["id"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    res = runner.invoke(main, ["marketing", "sentiment", "--jsonl", str(bad), "--model-dir", str(tmp_path / "m")])
    assert res.exit_code != 0 and "no \"text\" string" in res.output
