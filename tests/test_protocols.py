"""Evaluation protocols: k-fold, leave-one-out, percentage, hold-out and explicit splits."""

from __future__ import annotations

import json

import pytest

from medseg.evaluation import (
    explicit_split,
    holdout_split,
    kfold_splits,
    leave_one_out_splits,
    load_or_create_splits,
    percentage_split,
)

CASES = [f"case_{i:03d}" for i in range(11)]


@pytest.mark.parametrize("k", [2, 3, 5, 11])
def test_kfold_partitions_every_case_exactly_once(k):
    folds = kfold_splits(reversed(CASES), k, seed=3)
    assert len(folds) == k
    tested = [c for f in folds for c in f.test_ids]
    assert sorted(tested) == CASES  # every case tested once
    sizes = [len(f.test_ids) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for fold in folds:
        assert sorted(fold.train_ids + fold.test_ids) == CASES
        assert not set(fold.train_ids) & set(fold.test_ids)


def test_kfold_is_seeded():
    assert kfold_splits(CASES, 5, seed=1) == kfold_splits(list(reversed(CASES)), 5, seed=1)
    assert kfold_splits(CASES, 5, seed=1) != kfold_splits(CASES, 5, seed=2)
    with pytest.raises(ValueError, match="folds"):
        kfold_splits(CASES, 12, seed=0)
    with pytest.raises(ValueError, match="duplicates"):
        kfold_splits(["a", "b", "a"], 2, seed=0)


def test_leave_one_out_covers_every_case():
    folds = leave_one_out_splits(CASES)
    assert [f.test_ids for f in folds] == [[c] for c in CASES]
    assert all(sorted(f.train_ids + f.test_ids) == CASES for f in folds)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_splits(["only"])


def test_percentage_holdout_and_explicit():
    (fold,) = percentage_split(CASES, 0.25, seed=0)
    assert len(fold.test_ids) == 3 and sorted(fold.train_ids + fold.test_ids) == CASES
    assert percentage_split(CASES, 0.25, seed=0) == [fold]

    (hold,) = holdout_split(CASES, ["t1", "t0"], "test")
    assert hold.train_ids == CASES and hold.test_ids == ["t0", "t1"]
    assert hold.test_split == "test"
    with pytest.raises(ValueError, match="'test' has no cases"):
        holdout_split(CASES, [], "test")

    (lists,) = explicit_split(CASES, CASES[:3], CASES[5:7])
    assert lists.train_ids == CASES[:3] and lists.test_ids == CASES[5:7]
    with pytest.raises(ValueError, match=r"train_cases names cases not in split 'train': \['x'\]"):
        explicit_split(CASES, ["x", CASES[0]], [CASES[1]])
    with pytest.raises(ValueError, match="both in"):
        explicit_split(CASES, CASES[:2], CASES[1:3])
    with pytest.raises(ValueError, match="test_cases is empty"):
        explicit_split(CASES, CASES[:2], [])


def test_splits_file_is_written_and_reused(tmp_path):
    path = tmp_path / "splits" / "kfold.json"
    folds = load_or_create_splits(path, CASES, "kfold", k=3, seed=4)
    saved = json.loads(path.read_text())
    assert saved["case_ids"] == CASES and saved["num_folds"] == 3 and saved["seed"] == 4
    assert [f["test"] for f in saved["folds"]] == [f.test_ids for f in folds]

    # the file wins over the seed: same file, same folds
    assert load_or_create_splits(path, reversed(CASES), "kfold", k=3, seed=99) == folds
    # hand-edited folds in the file are what is used
    saved["folds"][0]["test"], saved["folds"][1]["test"] = (
        saved["folds"][1]["test"],
        saved["folds"][0]["test"],
    )
    path.write_text(json.dumps(saved))
    assert load_or_create_splits(path, CASES, "kfold", k=3)[0].test_ids == folds[1].test_ids

    with pytest.raises(ValueError, match=r"other cases \(not in the file: \['case_011'\]"):
        load_or_create_splits(path, [*CASES, "case_011"], "kfold", k=3)
    with pytest.raises(ValueError, match=r"no longer in the data: \['case_000'\]"):
        load_or_create_splits(path, CASES[1:], "kfold", k=3)
    with pytest.raises(ValueError, match="3 folds.*5 folds"):
        load_or_create_splits(path, CASES, "kfold", k=5)
    with pytest.raises(ValueError, match="'loo'"):
        load_or_create_splits(path, CASES, "loo")
    (tmp_path / "broken.json").write_text("[")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_or_create_splits(tmp_path / "broken.json", CASES, "kfold", k=3)


def test_loo_splits_file(tmp_path):
    path = tmp_path / "loo.json"
    folds = load_or_create_splits(path, CASES[:4], "loo")
    assert [f.test_ids for f in folds] == [[c] for c in CASES[:4]]
    assert load_or_create_splits(path, CASES[:4], "loo") == folds


def test_the_splits_record_round_trips_and_names_a_bad_file(tmp_path):
    from medseg.evaluation import kfold_splits
    from medseg.evaluation.protocols import Splits, load_or_create_splits

    ids = [f"case_{i}" for i in range(6)]
    folds = load_or_create_splits(tmp_path / "s.json", ids, "kfold", 3, seed=4)
    splits = Splits.load(tmp_path / "s.json")
    assert splits.folds == tuple(folds) == tuple(kfold_splits(ids, 3, 4))
    assert (splits.protocol, splits.seed, splits.num_folds) == ("kfold", 4, 3)
    assert Splits.from_dict(splits.to_dict()) == splits
    broken = splits.to_dict()
    broken["folds"][0]["test"] = broken["folds"][1]["test"]  # a case tested twice
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="bad.json: its folds do not test every case exactly once"):
        Splits.load(tmp_path / "bad.json")
