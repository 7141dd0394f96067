"""Evaluation protocols: which cases train and which test each model.

Every protocol yields a list of `Fold`\\ s: k-fold cross-validation (seeded, saved as JSON and
reused), leave-one-out over every case, a seeded percentage split, a hold-out split (a
second TFDS split such as ``test``) and explicit train/test lists. Plain functions over case
ids, free of TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.io.jsonfile import read_json, write_json

__all__ = [
    "PROTOCOLS",
    "Splits",
    "Fold",
    "explicit_split",
    "holdout_split",
    "kfold_splits",
    "leave_one_out_splits",
    "load_or_create_splits",
    "nnunet_splits",
    "percentage_split",
]

PROTOCOLS = ("split", "kfold", "loo", "holdout", "lists")


@dataclass(frozen=True)
class Fold:
    """One model's cases: trained on ``train_ids`` (of the training split), tested on
    ``test_ids`` of ``test_split`` (``None``: the training split itself)."""

    name: str
    train_ids: list[str]
    test_ids: list[str]
    test_split: str | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "train": list(self.train_ids),
            "test": list(self.test_ids),
            "test_split": self.test_split,
        }


def _unique_sorted(case_ids: Sequence[str], what: str = "case ids") -> list[str]:
    ids = [str(c) for c in case_ids]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"{what} contain duplicates: {duplicates}")
    return sorted(ids)


def kfold_splits(case_ids: Sequence[str], k: int, seed: int) -> list[Fold]:
    """Seeded k-fold partition: every case is tested exactly once.

    Parameters
    ----------
    case_ids : sequence of str
        Cases to split (order does not matter: they are sorted first).
    k : int
        Number of folds, ``2 <= k <= len(case_ids)``.
    seed : int
        Seed of the permutation; the same ids and seed always give the same folds.

    Returns
    -------
    folds : list of Fold
        ``fold_0 .. fold_{k-1}``; test sets differ in size by at most one (sklearn's KFold
        sizes after a seeded shuffle), ids sorted within each set.
    """
    ids = _unique_sorted(case_ids)
    if not 2 <= k <= len(ids):
        raise ValueError(f"k-fold needs 2 <= folds <= number of cases ({len(ids)}), got {k}")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, k)
    folds = []
    for i, part in enumerate(parts):
        test = sorted(ids[j] for j in part)
        held = set(test)
        folds.append(Fold(f"fold_{i}", [c for c in ids if c not in held], test))
    return folds


def leave_one_out_splits(case_ids: Sequence[str]) -> list[Fold]:
    """One fold per case, testing that case on a model trained on all the others."""
    ids = _unique_sorted(case_ids)
    if len(ids) < 2:
        raise ValueError(f"leave-one-out needs at least 2 cases, got {len(ids)}")
    return [Fold(f"loo_{c}", [d for d in ids if d != c], [c]) for c in ids]


def percentage_split(case_ids: Sequence[str], fraction: float, seed: int) -> list[Fold]:
    """One seeded fold holding out ``fraction`` of the cases (at least one each side)."""
    from medseg.pipeline.reading import split_cases  # TF-free callers never pay for tf.data

    train, test = split_cases(_unique_sorted(case_ids), fraction, seed)
    return [Fold("split", train, test)]


def holdout_split(train_ids: Sequence[str], test_ids: Sequence[str], test_split: str) -> list[Fold]:
    """One fold training on every case of the training split, testing on ``test_split``."""
    if not test_ids:
        raise ValueError(f"hold-out split {test_split!r} has no cases")
    return [
        Fold("holdout", _unique_sorted(train_ids), _unique_sorted(test_ids, test_split), test_split)
    ]


def explicit_split(
    case_ids: Sequence[str], train: Sequence[str], test: Sequence[str], split: str = "train"
) -> list[Fold]:
    """One fold from explicit lists, checked against the split's cases.

    Raises
    ------
    ValueError
        If a list is empty, names a case not in ``case_ids`` or the lists overlap.
    """
    known = set(case_ids)
    train = _unique_sorted(train, "evaluation.train_cases")
    test = _unique_sorted(test, "evaluation.test_cases")
    for key, ids in (("evaluation.train_cases", train), ("evaluation.test_cases", test)):
        if not ids:
            raise ValueError(f"{key} is empty; the 'lists' protocol needs both lists")
        unknown = [c for c in ids if c not in known]
        if unknown:
            raise ValueError(f"{key} names cases not in split {split!r}: {unknown}")
    both = sorted(set(train) & set(test))
    if both:
        raise ValueError(f"cases both in evaluation.train_cases and evaluation.test_cases: {both}")
    return [Fold("lists", train, test)]


@dataclass(frozen=True)
class Splits:
    """Saved k-fold or leave-one-out folds: the record behind ``evaluation.splits_file``.

    Attributes
    ----------
    protocol : {"kfold", "loo"}
    seed : int
        The seed the folds were drawn with (only matters when they are made).
    case_ids : tuple of str
        Every case, sorted; each is tested by exactly one fold.
    folds : tuple of Fold
    """

    protocol: str
    seed: int
    case_ids: tuple[str, ...]
    folds: tuple[Fold, ...]

    @property
    def num_folds(self) -> int:
        return len(self.folds)

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "num_folds": self.num_folds,
            "seed": self.seed,
            "case_ids": list(self.case_ids),
            "folds": [f.to_dict() for f in self.folds],
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "splits") -> Splits:
        """Read a splits record; ``where`` (the file) names it in errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} is not a medseg splits file")
        try:
            folds = tuple(
                Fold(str(f["name"]), list(f["train"]), list(f["test"]), f.get("test_split"))
                for f in data["folds"]
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where} is not a medseg splits file: {err!r}") from err
        splits = cls(
            protocol=str(data.get("protocol")),
            seed=int(data.get("seed") or 0),
            case_ids=tuple(sorted(str(c) for c in data.get("case_ids", []))),
            folds=folds,
        )
        if data.get("num_folds") not in (None, len(folds)):
            raise ValueError(
                f"{where}: 'num_folds' is {data.get('num_folds')} but it lists {len(folds)} folds"
            )
        tested = sorted(c for f in folds for c in f.test_ids)
        if tested != list(splits.case_ids):
            raise ValueError(f"{where}: its folds do not test every case exactly once")
        return splits

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Splits:
        return cls.from_dict(read_json(path, "splits file"), where=f"splits file {path}")


def load_or_create_splits(
    path: str | os.PathLike,
    case_ids: Sequence[str],
    protocol: str,
    k: int = 5,
    seed: int = 0,
) -> list[Fold]:
    """K-fold or leave-one-out folds, read from ``path`` if present, else made and saved.

    A present file is authoritative (its seed only mattered when it was made), but it must
    describe the same cases and the same protocol and number of folds.

    Parameters
    ----------
    path : path-like
        JSON file ``{"protocol", "num_folds", "seed", "case_ids", "folds": [...]}``, or
        nnU-Net's ``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``),
        read by :func:`nnunet_splits` and never rewritten.
    case_ids : sequence of str
        The cases of the training split now.
    protocol : {"kfold", "loo"}
    k : int
        Number of folds for ``"kfold"``.
    seed : int
        Seed for a new k-fold split.

    Raises
    ------
    ValueError
        If the file lists other cases, another protocol or another number of folds.
    """
    path = Path(path)
    ids = _unique_sorted(case_ids)
    if protocol not in ("kfold", "loo"):
        raise ValueError(f"saved splits are for 'kfold' and 'loo', not {protocol!r}")
    if path.exists():
        data = read_json(path, "splits file")
        if isinstance(data, list):  # nnU-Net's splits_final.json
            return nnunet_splits(data, ids, protocol, k, where=f"splits file {path}")
        saved = sorted(data.get("case_ids", [])) if isinstance(data, dict) else None
        if saved is not None and saved != ids:
            missing = sorted(set(ids) - set(saved))
            extra = sorted(set(saved) - set(ids))
            raise ValueError(
                f"splits file {path} was made for other cases (not in the file: {missing}; "
                f"no longer in the data: {extra}); delete it or set evaluation.splits_file"
            )
        expected_k = len(ids) if protocol == "loo" else k
        if isinstance(data, dict) and (
            data.get("protocol") != protocol or data.get("num_folds") != expected_k
        ):
            raise ValueError(
                f"splits file {path} holds {data.get('protocol')!r} with "
                f"{data.get('num_folds')} folds, but {protocol!r} with {expected_k} folds was "
                "asked for; delete it or set evaluation.splits_file"
            )
        return list(Splits.from_dict(data, where=f"splits file {path}").folds)
    folds = leave_one_out_splits(ids) if protocol == "loo" else kfold_splits(ids, k, seed)
    Splits(protocol, seed, tuple(ids), tuple(folds)).save(path)
    return folds


def nnunet_splits(
    data: object, case_ids: Sequence[str], protocol: str, k: int, where: str = "splits"
) -> list[Fold]:
    """The folds of nnU-Net's ``splits_final.json``: fold ``i`` trains on ``train``, tests
    on ``val``.

    Parameters
    ----------
    data : list of dict
        The file's content, ``[{"train": [...], "val": [...]}, ...]``.
    case_ids : sequence of str
        The cases of the training split now.
    protocol : str
        ``evaluation.protocol``; must be ``"kfold"`` (nnU-Net's folds are k-fold).
    k : int
        ``evaluation.folds``; must equal the number of folds in the file.
    where : str
        The file, for errors.

    Raises
    ------
    ValueError
        Naming the file: not that layout, another protocol or fold count, case ids not in
        the data, or a fold whose train and val lists overlap.
    """
    if protocol != "kfold":
        raise ValueError(
            f"{where} is nnU-Net's splits_final.json (k-fold) but evaluation.protocol is "
            f"{protocol!r}; set evaluation.protocol=kfold"
        )
    if not isinstance(data, list) or not data or not all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list)
        for f in data
    ):
        raise ValueError(
            f"{where} is neither a medseg splits file nor nnU-Net's splits_final.json "
            '(a list of {"train": [...], "val": [...]})'
        )
    if len(data) != k:
        raise ValueError(
            f"{where} holds {len(data)} nnU-Net folds but evaluation.folds is {k}; "
            f"set evaluation.folds={len(data)}"
        )
    known = set(case_ids)
    folds = []
    for i, fold in enumerate(data):
        train = _unique_sorted(fold["train"], f"{where} fold {i} train")
        test = _unique_sorted(fold["val"], f"{where} fold {i} val")
        unknown = sorted((set(train) | set(test)) - known)
        if unknown:
            raise ValueError(
                f"{where}: fold {i} names case ids not in the dataset: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}; was it made for another dataset?"
            )
        both = sorted(set(train) & set(test))
        if both:
            raise ValueError(f"{where}: fold {i} has cases both in train and val: {both[:10]}")
        folds.append(Fold(f"fold_{i}", train, test))
    return folds
