"""Public datasets, read from a folder outside the repository (the repository never holds copies).

The data directory holds one sub-folder per dataset (``banking77/``, ...). It is ``$ORCH_DATA_DIR``
when set, else ``../shared/data`` beside the checkout (``REPO_DIR.parent / "shared" / "data"``) when
that folder exists. A dataset that is not there raises :class:`DatasetMissing`, a
``FileNotFoundError`` whose message names the dataset, the path looked at and the variable to set.

BANKING77 (CC BY 4.0, Casanueva et al. 2020, arXiv:2003.04807): ``banking77/train.csv`` and
``test.csv``, columns ``text,category``. Train on train.csv only; test.csv is for reporting.

Only the standard library is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .settings import REPO_DIR

ENV_VAR = "ORCH_DATA_DIR"
DEFAULT_DATA_DIR = REPO_DIR.parent / "shared" / "data"
BANKING77 = "banking77"
BANKING77_SPLITS = ("train", "test")

__all__ = ["BANKING77", "DEFAULT_DATA_DIR", "ENV_VAR", "DatasetMissing", "banking77_csv", "banking77_queries",
           "data_dir", "dataset_dir", "dataset_file", "read_banking77"]


class DatasetMissing(FileNotFoundError):
    """A public dataset is not in the data directory."""

    def __init__(self, name: str, path: Path, detail: str = ""):
        self.name, self.path = name, Path(path)
        where = os.environ.get(ENV_VAR)
        source = f"{ENV_VAR}={where}" if where else f"default {DEFAULT_DATA_DIR}, {ENV_VAR} unset"
        super().__init__(
            f"dataset {name!r} not found: looked at {self.path} ({source}){': ' + detail if detail else ''}. "
            f"Set {ENV_VAR} to the folder holding {name}/ (e.g. {ENV_VAR}=../shared/data from the checkout).")

    def __reduce__(self):  # picklable across processes
        return (_rebuild, (self.name, str(self.path), str(self)))


def _rebuild(name: str, path: str, message: str) -> "DatasetMissing":
    exc = DatasetMissing.__new__(DatasetMissing)
    FileNotFoundError.__init__(exc, message)
    exc.name, exc.path = name, Path(path)
    return exc


def data_dir() -> Path:
    """The folder holding the datasets: ``$ORCH_DATA_DIR``, else ``../shared/data`` beside the checkout.

    The default is returned even when it does not exist; :func:`dataset_dir` checks."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else DEFAULT_DATA_DIR


def dataset_dir(name: str) -> Path:
    """``<data dir>/<name>``; :class:`DatasetMissing` when it is not a folder."""
    path = data_dir() / name
    if not path.is_dir():
        raise DatasetMissing(name, path)
    return path


def dataset_file(name: str, filename: str) -> Path:
    """``<data dir>/<name>/<filename>``; :class:`DatasetMissing` when the folder or the file is missing."""
    path = dataset_dir(name) / filename
    if not path.is_file():
        raise DatasetMissing(name, path, f"no {filename} in the dataset folder")
    return path


def banking77_csv(split: str = "train") -> Path:
    """The path of BANKING77's ``train.csv`` or ``test.csv``."""
    if split not in BANKING77_SPLITS:
        raise ValueError(f"BANKING77 split {split!r} is not one of {BANKING77_SPLITS}")
    return dataset_file(BANKING77, f"{split}.csv")


def read_banking77(split: str = "train", path: Path | None = None) -> tuple[list[str], list[str]]:
    """BANKING77 texts and intents (columns ``text``, ``category``) verbatim, in file order: what the
    triage model trains and is evaluated on. ``path`` reads that CSV instead of the data directory's."""
    import csv

    with open(path or banking77_csv(split), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def banking77_queries(split: str = "train", path: Path | None = None) -> list[tuple[str, str]]:
    """``(text, intent)`` rows with whitespace normalised (the source has a few stray leading newlines)
    and rows with an empty text or intent skipped; intents verbatim (the dataset's own spellings such as
    ``Refund_not_showing_up``). The core sentences the seeded sample generators build on."""
    import csv

    rows: list[tuple[str, str]] = []
    with open(path or banking77_csv(split), encoding="utf-8", newline="") as fh:
        for rec in csv.DictReader(fh):
            text = " ".join((rec.get("text") or "").split())
            intent = (rec.get("category") or "").strip()
            if text and intent:
                rows.append((text, intent))
    return rows


TWEETS = "tweets-dev"


def read_tweets() -> tuple[list[str], list[int]]:
    """TweetEval's sentiment dev split (``tweets-dev/``: ``val_text.txt`` one tweet a line, ``val_labels.txt``
    0 negative / 1 neutral / 2 positive on the same line): texts and label ids, in file order."""
    texts = dataset_file(TWEETS, "val_text.txt").read_text(encoding="utf-8").splitlines()
    labels = [int(x) for x in dataset_file(TWEETS, "val_labels.txt").read_text(encoding="utf-8").split()]
    if len(texts) != len(labels):
        raise DatasetMissing(TWEETS, dataset_dir(TWEETS), f"{len(texts)} texts but {len(labels)} labels")
    return texts, labels


WORKBENCH = "workbench"


def atlas_crm() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The Atlas workspace's CRM (``workbench/customer_relationship_manager_data.csv``, MIT, fictitious people)
    as CRM contact rows for ``connectors.embedded.import_contacts`` (ids ``atlas-<customer_id>``), and the rows
    as read. Raises ``DatasetMissing`` when the data directory does not have it."""
    import csv

    path = dataset_file(WORKBENCH, "customer_relationship_manager_data.csv")
    with path.open(encoding="utf-8") as fh:
        crm = list(csv.DictReader(fh))
    rows = [{"contact_id": f"atlas-{r['customer_id']}", "name": r["customer_name"], "email": r["customer_email"],
             "phone": r["customer_phone"] or None, "company": r["customer_email"].split("@")[-1].title(),
             "owner": r["assigned_to_email"], "stage": r["status"], "source": "atlas_crm", "notes": r["notes"],
             "country": "US"} for r in crm]
    return rows, crm
