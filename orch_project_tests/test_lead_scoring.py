"""The generic tabular scorer (orch_project.lib.tabular) on the generated lead history, and the
`orch leads` commands (invoked through their click group: the `orch leads` entry point appears once
the leads flow exists).

Kept fast: a 2,500-row history, models trained once per module."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from orch_project.defs.leads.cli import group
from orch_project.defs.leads.history_data import (ID_COLUMN, LABEL_COLUMN, QUALIFICATION_COLUMNS, TEXT_COLUMN,
                                                  generate_history)
from orch_project.lib import tabular

REASON = re.compile(r"^(?P<col>.+?)( = .+| high| low| missing| mentions \".+\"| text) \([+-]\d+\.\d\d\)$")
METRIC_KEYS = {"n", "auc", "accuracy", "log_loss", "brier", "lift_top_decile"}


@pytest.fixture(scope="module")
def split():
    from sklearn.model_selection import train_test_split

    df = generate_history(2500, 11)
    tr, te = train_test_split(df, test_size=0.2, stratify=df[LABEL_COLUMN], random_state=0)
    return tr.reset_index(drop=True), te.reset_index(drop=True)


@pytest.fixture(scope="module")
def model(split):
    return tabular.train(split[0], LABEL_COLUMN, seed=0, search_budget_s=0)  # first configuration only


@pytest.fixture(scope="module")
def model_without(split):
    return tabular.train(split[0], LABEL_COLUMN, exclude_columns=QUALIFICATION_COLUMNS, seed=0, search_budget_s=0)


def plain_hgb_auc(train_df, test_df, drop) -> float:
    """A plain HistGradientBoosting baseline: raw columns, strings as native categories."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    def frame(df):
        x = df.drop(columns=[LABEL_COLUMN, *drop]).copy()
        for c in x.columns:
            if x[c].dtype == object:
                num = pd.to_numeric(x[c], errors="coerce")
                x[c] = num if num.notna().any() else x[c].astype("category")
        return x

    xtr, xte = frame(train_df), frame(test_df)
    for c in xtr.columns:
        if str(xtr[c].dtype) == "category":
            xte[c] = pd.Categorical(xte[c], categories=xtr[c].cat.categories)
    m = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=0)
    m.fit(xtr, train_df[LABEL_COLUMN])
    return float(roc_auc_score(test_df[LABEL_COLUMN], m.predict_proba(xte)[:, 1]))


def test_beats_trivial_and_matches_plain_boosting(split, model, model_without):
    tr, te = split
    res = tabular.evaluate(model, te, LABEL_COLUMN)
    assert set(res) == METRIC_KEYS and res["n"] == len(te)
    assert res["auc"] >= 0.93  # a constant score has AUC 0.5
    assert res["lift_top_decile"] > 2.0
    drop = [ID_COLUMN, "Lead Number", TEXT_COLUMN]
    assert res["auc"] >= plain_hgb_auc(tr, te, drop) - 0.01
    res_w = tabular.evaluate(model_without, te, LABEL_COLUMN)
    assert 0.8 <= res_w["auc"] < res["auc"]
    assert res_w["auc"] >= plain_hgb_auc(tr, te, drop + list(QUALIFICATION_COLUMNS)) - 0.01
    m = model.metrics
    assert m["version"].startswith("tabular-") and len(m["version"].split("-")[1]) == 12
    assert len(m["train_data_hash"]) == 64 and m["train_seconds"] > 0
    assert m["validation"]["auc"] > 0.9 and m["columns"][ID_COLUMN] == "id" and m["columns"]["Lead Number"] == "id"
    assert m["columns"][TEXT_COLUMN] == "text" and m["columns"]["TotalVisits"] == "numeric"
    assert m["columns"]["Do Not Email"] == "boolean" and m["columns"]["Lead Source"] == "categorical"
    assert m["columns"]["Magazine"] == "dropped" and m["dropped"]["Magazine"] == "constant"


def test_calibrated(split, model):
    te = split[1]
    y = te[LABEL_COLUMN].to_numpy()
    p = model.predict_proba(te)
    assert p.shape == (len(te),) and np.all((p > 0) & (p < 1))
    prior = y.mean()
    assert tabular.evaluate(model, te, LABEL_COLUMN)["brier"] < 0.6 * prior * (1 - prior)
    assert abs(p.mean() - prior) < 0.04
    assert model.metrics["calibration"]["ece"] < 0.05


def test_placeholders_are_missing_and_constant_columns_dropped():
    rng = np.random.default_rng(3)
    n = 400
    x = rng.normal(size=n)
    df = pd.DataFrame({
        "key": [f"k{i:05d}" for i in range(n)],
        "signal": x.round(3).astype(str),  # numbers as text
        "colour": rng.choice(["Red", "red ", "Blue", "Select", "", "N/A", "Green"], n),
        "form": ["Select"] * n,  # only placeholders -> dropped
        "flag": rng.choice(["Yes", "No"], n),
        "label": np.where(x + rng.normal(0, 0.5, n) > 0, "yes", "no"),
    })
    cols, _ = tabular.infer_schema(df, "label")
    roles = {c.name: c.role for c in cols}
    assert roles == {"key": "id", "signal": "numeric", "colour": "categorical", "form": "dropped",
                     "flag": "boolean", "label": "dropped"}
    colour = next(c for c in cols if c.name == "colour")
    assert sorted(colour.levels) == ["Blue", "Green", "Red"]  # "red " merged into "Red"; placeholders gone
    m = tabular.train(df, "label", seed=1, search_budget_s=0)
    assert m.metrics["dropped"]["form"].startswith("all missing")
    x_mat, _ = m._matrix(df)
    j = m._features.slices["colour"].start
    assert np.isnan(x_mat[df["colour"].isin(["Select", "", "N/A"]).to_numpy(), j]).all()
    assert not np.isnan(x_mat[df["colour"].isin(["Red", "Blue"]).to_numpy(), j]).any()
    # deterministic given the seed
    again = tabular.train(df, "label", seed=1, search_budget_s=0)
    assert np.array_equal(m.predict_proba(df), again.predict_proba(df)) and m.version == again.version


@pytest.mark.parametrize("values,expected", [
    (["yes", "No", " YES "], [1, 0, 1]), (["true", "false", "True"], [1, 0, 1]),
    (["Converted", "not converted", "converted"], [1, 0, 1]), ([1, 0, 1], [1, 0, 1]), ([True, False, True], [1, 0, 1]),
])
def test_label_values(values, expected):
    assert tabular.parse_labels(pd.Series(values)).tolist() == expected


def test_unseen_categories_and_missing_columns(split, model):
    te = split[1].head(50).copy()
    te["Lead Source"] = "A source nobody has seen"
    te["Country"] = "Atlantis"
    te["Brand new column"] = "x"
    te = te.drop(columns=["Specialization", TEXT_COLUMN])
    p = model.predict_proba(te)
    assert np.isfinite(p).all() and len(p) == 50
    assert set(model.missing_columns(te)) == {"Specialization", TEXT_COLUMN}
    rows = model.score(te)
    assert all(0 <= r["score"] <= 1 for r in rows)


def test_reasons_name_real_columns(split, model):
    te = split[1].head(300)
    rows = model.score(te)
    assert [r["id"] for r in rows] == te[ID_COLUMN].tolist()
    assert all(r["reasons"] for r in rows)
    features = set(model.feature_columns)
    for r in rows:
        assert len(r["reasons"]) <= 6
        for text in r["reasons"]:
            m = REASON.match(text)
            assert m and m.group("col") in features, text
    detail = model.explain(te.head(20))
    for row in detail:
        pos = [d["contribution"] for d in row if d["contribution"] > 0]
        assert pos == sorted(pos, reverse=True)
    # the strongest evidence in this data shows up somewhere
    mentioned = {REASON.match(t).group("col") for r in rows for t in r["reasons"]}
    assert {"Tags", "Total Time Spent on Website"} <= mentioned


def test_exclude_columns(split, model_without):
    te = split[1].head(200).copy()
    m = model_without.metrics
    assert all(m["columns"][c] == "dropped" and m["dropped"][c] == "excluded" for c in QUALIFICATION_COLUMNS)
    assert not set(QUALIFICATION_COLUMNS) & set(model_without.feature_columns)
    before = model_without.predict_proba(te)
    te["Tags"] = "Closed by partner"
    te["Lead Quality"] = "High in Relevance"
    assert np.array_equal(before, model_without.predict_proba(te))
    for r in model_without.score(te):
        assert not any(t.startswith(tuple(QUALIFICATION_COLUMNS)) for t in r["reasons"])
    with pytest.raises(tabular.TabularError, match="not in the data"):
        tabular.train(split[0], LABEL_COLUMN, exclude_columns=["No such column"])


def test_save_load_round_trip(tmp_path, split, model):
    te = split[1]
    path = model.save(tmp_path)
    assert path.name == f"{model.version}.joblib" and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["version"] == model.version and meta["code_version"] == tabular.CODE_VERSION
    loaded = tabular.TabularModel.load(path)
    assert np.array_equal(loaded.predict_proba(te), model.predict_proba(te))
    assert loaded.score(te.head(30)) == model.score(te.head(30))
    assert tabular.latest_model(tmp_path) == path
    meta["code_version"] = "tabular-older-v0"
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(tabular.ModelVersionError, match="Retrain"):
        tabular.TabularModel.load(path)


def test_training_errors(split):
    tr = split[0]
    with pytest.raises(tabular.TabularError, match="no label column"):
        tabular.train(tr, "Outcome")
    with pytest.raises(tabular.TabularError, match="both classes"):
        tabular.train(tr.assign(**{LABEL_COLUMN: 1}), LABEL_COLUMN)
    with pytest.raises(tabular.TabularError, match="label values"):
        tabular.train(tr.assign(**{LABEL_COLUMN: "maybe"}), LABEL_COLUMN)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory, split):
    d = tmp_path_factory.mktemp("leads")
    tr, te = split
    tr.head(1500).to_csv(d / "train.csv", index=False)
    te.to_csv(d / "test.csv", index=False)
    te.drop(columns=[LABEL_COLUMN]).head(40).to_json(d / "new.jsonl", orient="records", lines=True)
    return d


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_cli_train_evaluate_score(files, monkeypatch):
    monkeypatch.setattr(tabular, "SEARCH_BUDGET_SECONDS", 0)  # one configuration: keeps the test quick
    runner = CliRunner()
    models = files / "models"
    res = runner.invoke(group, ["train", "--train", str(files / "train.csv"), "--label-column", LABEL_COLUMN,
                                "--id-column", ID_COLUMN, "--exclude-columns", ",".join(QUALIFICATION_COLUMNS[:2]),
                                "--model-dir", str(models), "--seed", "3"])
    assert res.exit_code == 0, res.output
    summary = _last_json(res.stdout)
    assert summary["version"].startswith("lead_score-") and summary["path"].endswith(".joblib")
    assert summary["validation"]["auc"] > 0.85 and summary["train_seconds"] > 0
    assert summary["columns"]["Tags"] == "dropped" and summary["columns"][ID_COLUMN] == "id"
    assert "out-of-fold AUC" in res.stderr

    res = runner.invoke(group, ["evaluate", "--test", str(files / "test.csv"), "--label-column", LABEL_COLUMN,
                                "--model-dir", str(models)])
    assert res.exit_code == 0, res.output
    out = _last_json(res.stdout)
    assert set(out) == METRIC_KEYS and out["auc"] > 0.85 and not math.isnan(out["brier"])

    res = runner.invoke(group, ["score", str(files / "new.jsonl"), "--model-dir", summary["path"], "--jsonl"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(lines) == 40 and all(set(r) == {"id", "score", "reasons"} for r in lines)
    new = pd.read_json(files / "new.jsonl", lines=True)
    assert [r["id"] for r in lines] == new[ID_COLUMN].tolist()
    assert all(isinstance(t, str) for r in lines for t in r["reasons"])


def test_cli_errors(files, tmp_path):
    runner = CliRunner()
    train = str(files / "train.csv")

    def err(args):
        res = runner.invoke(group, args)
        assert res.exit_code != 0
        return res.output

    assert "no column 'Outcome' (--label-column)" in err(["train", "--train", train, "--label-column", "Outcome",
                                                          "--model-dir", str(tmp_path)])
    assert "does not exist" in err(["train", "--train", str(tmp_path / "nope.csv"), "--label-column", "x"])
    (tmp_path / "empty.csv").write_text("")
    assert "is empty" in err(["train", "--train", str(tmp_path / "empty.csv"), "--label-column", "x"])
    (tmp_path / "header.csv").write_text("a,b,Converted\n")
    assert "has no rows" in err(["train", "--train", str(tmp_path / "header.csv"), "--label-column", "Converted"])
    one = pd.read_csv(train).head(200).assign(**{LABEL_COLUMN: 0})
    one.to_csv(tmp_path / "one.csv", index=False)
    assert "both classes" in err(["train", "--train", str(tmp_path / "one.csv"), "--label-column", LABEL_COLUMN,
                                  "--model-dir", str(tmp_path)])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert "could not read" in err(["score", str(tmp_path / "bad.jsonl"), "--model-dir", str(tmp_path)])
    assert "no lead model" in err(["evaluate", "--test", str(files / "test.csv"), "--label-column", LABEL_COLUMN,
                                   "--model-dir", str(tmp_path / "none")])
    assert "train one first" in err(["score", str(files / "test.csv"), "--model-dir", str(tmp_path / "none")])
