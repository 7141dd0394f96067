"""nnU-Net interop: raw datasets (``nnunet_raw``), ``_0000/_0001`` prediction inputs,
``splits_final.json`` folds and ``medseg score`` (nnU-Net's ``summary.json``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.evaluation.protocols import load_or_create_splits
from medseg.evaluation.scoring import labels_from_dataset_json, score_folder
from medseg.inference.files import find_inputs
from medseg.io import MedsegIOError

AFFINE = np.diag([4.0, 2.0, 2.0, 1.0])
SHAPE = (16, 32, 32)
# a region-based dataset.json: "kidney" is the union of labels 1 and 2
LABELS = {"background": 0, "kidney": [1, 2], "tumor": 2}


def phantom(rng, shape=SHAPE):
    """A label map with a kidney (1) holding a tumour (2), and two channels showing it."""
    z, y, x = np.indices(shape)
    c = [s // 2 + int(rng.integers(-2, 3)) for s in shape]
    r = ((z - c[0]) / 5.0) ** 2 + ((y - c[1]) / 9.0) ** 2 + ((x - c[2]) / 9.0) ** 2
    label = np.where(r < 1.0, 1, 0).astype(np.uint8)
    label[r < 0.3] = 2
    ct = (label * 120.0 + rng.normal(0, 20, shape)).astype(np.float32)
    t2 = ((label == 2) * 200.0 + rng.normal(0, 20, shape)).astype(np.float32)
    return label, [ct, t2]


def save(array, path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)


def make_raw(root: Path, train=4, test=0, channels=2, labels=None, file_ending=".nii.gz"):
    """``root/Dataset001_Phantom`` in nnU-Net v2's raw layout; its dataset.json."""
    rng = np.random.default_rng(0)
    folder = root / "Dataset001_Phantom"
    for split, count in (("Tr", train), ("Ts", test)):
        for i in range(count):
            case = f"case{split.lower()}_{i:03d}"
            label, images = phantom(rng)
            for c in range(channels):
                save(images[c], folder / f"images{split}" / f"{case}_{c:04d}.nii.gz")
            save(label, folder / f"labels{split}" / f"{case}.nii.gz")
    meta = {
        "channel_names": {str(c): name for c, name in enumerate(["CT", "T2"][:channels])},
        "labels": labels or LABELS,
        "numTraining": train,
        "file_ending": file_ending,
    }
    if "kidney" in (labels or LABELS):
        meta["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder / "dataset.json"


# -- dataset.json and the raw layout --------------------------------------------------------


def test_dataset_json_labels_and_regions(tmp_path):
    from medseg_datasets.nnunet_raw import read_dataset_json

    config = read_dataset_json(make_raw(tmp_path, train=1))
    assert config.class_names == ("background", "label_1", "tumor")
    # "tumor": 2 is the class "tumor" itself: not stored twice
    assert config.regions == {"kidney": [1, 2]}
    assert config.modalities == ("CT", "T2")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "tumor": 2}}))
    assert labels_from_dataset_json(plain) == (["background", "kidney", "tumor"], {})


def test_unknown_file_ending_is_refused_naming_dataset_json(tmp_path):
    from medseg_datasets.nnunet_raw import read_dataset_json

    path = make_raw(tmp_path, train=1, file_ending=".mha")
    with pytest.raises(ValueError, match=r"dataset\.json: file_ending '\.mha' is not supported"):
        read_dataset_json(path)


def test_non_consecutive_labels_are_refused(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "tumor": 3}}))
    with pytest.raises(ValueError, match=r"label values \[0, 3\] must be consecutive"):
        labels_from_dataset_json(path)


def test_case_missing_a_channel_file_is_named(tmp_path):
    from medseg_datasets.nnunet_raw import read_dataset_json
    from medseg_datasets.nnunet_raw.nnunet_raw_dataset_builder import find_cases

    path = make_raw(tmp_path, train=2)
    missing = path.parent / "imagesTr" / "casetr_001_0001.nii.gz"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="case 'casetr_001' misses channel file") as err:
        find_cases(read_dataset_json(path), "imagesTr", "labelsTr")
    assert str(missing) in str(err.value)


def test_undeclared_channel_file_is_named(tmp_path):
    from medseg_datasets.nnunet_raw import read_dataset_json
    from medseg_datasets.nnunet_raw.nnunet_raw_dataset_builder import find_cases

    path = make_raw(tmp_path, train=1)
    extra = path.parent / "imagesTr" / "casetr_000_0002.nii.gz"
    save(np.zeros(SHAPE, np.float32), extra)
    with pytest.raises(ValueError, match="is channel 2, but .* declares 2 channel"):
        find_cases(read_dataset_json(path), "imagesTr", "labelsTr")


def test_label_value_not_declared_is_named(tmp_path):
    from medseg_datasets.nnunet_raw import read_dataset_json
    from medseg_datasets.nnunet_raw.nnunet_raw_dataset_builder import find_cases

    path = make_raw(tmp_path, train=1)
    label_path = path.parent / "labelsTr" / "casetr_000.nii.gz"
    label = np.asarray(nib.load(label_path).dataobj).copy()
    label[0, 0, 0] = 5
    save(label, label_path)
    (loader,) = find_cases(read_dataset_json(path), "imagesTr", "labelsTr")
    with pytest.raises(MedsegIOError, match=r"label values \[5\] are not declared in 'labels'"):
        loader()


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_channels_on_different_grids_are_refused(tmp_path, what):
    from medseg_datasets.nnunet_raw import read_dataset_json
    from medseg_datasets.nnunet_raw.nnunet_raw_dataset_builder import find_cases

    path = make_raw(tmp_path, train=1)
    second = path.parent / "imagesTr" / "casetr_000_0001.nii.gz"
    if what == "shape":
        save(np.zeros((16, 32, 30), np.float32), second)
    else:
        save(np.zeros(SHAPE, np.float32), second, affine=np.diag([4.0, 2.0, 2.5, 1.0]))
    (loader,) = find_cases(read_dataset_json(path), "imagesTr", "labelsTr")
    with pytest.raises(MedsegIOError, match="every channel and the label must share one grid") as err:
        loader()
    assert str(second) in str(err.value)


def test_loader_stacks_channels_last(tmp_path):
    from medseg_datasets.nnunet_raw import read_dataset_json
    from medseg_datasets.nnunet_raw.nnunet_raw_dataset_builder import find_cases

    path = make_raw(tmp_path, train=1)
    (loader,) = find_cases(read_dataset_json(path), "imagesTr", "labelsTr")
    record = loader()
    images = path.parent / "imagesTr"
    for c in range(2):
        expected = np.asarray(nib.load(images / f"casetr_000_{c:04d}.nii.gz").dataobj)
        np.testing.assert_array_equal(record.image[..., c], expected)
    assert record.case_id == "casetr_000" and record.spacing == (4.0, 2.0, 2.0)


# -- prediction inputs ------------------------------------------------------------------------


def test_find_inputs_groups_channel_files(tmp_path):
    path = make_raw(tmp_path, train=2)
    images = path.parent / "imagesTr"
    cases = find_inputs([images])
    assert [c for c, _ in cases] == ["casetr_000", "casetr_001"]
    assert cases[0][1] == (images / "casetr_000_0000.nii.gz", images / "casetr_000_0001.nii.gz")


def test_find_inputs_single_files_as_before(tmp_path):
    path = make_raw(tmp_path, train=2, channels=1)
    images = path.parent / "imagesTr"
    # a folder of _0000 files only: one case per file, named as today
    assert [c for c, _ in find_inputs([images])] == ["casetr_000_0000", "casetr_001_0000"]
    one = images / "casetr_000_0000.nii.gz"
    assert find_inputs([one]) == [("casetr_000_0000", one)]


def test_find_inputs_refuses_missing_and_extra_channels(tmp_path):
    path = make_raw(tmp_path, train=3)
    images = path.parent / "imagesTr"
    (images / "casetr_001_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case 'casetr_001' has channel files _0000, but"):
        find_inputs([images])
    save(np.zeros(SHAPE, np.float32), images / "casetr_001_0001.nii.gz")
    save(np.zeros(SHAPE, np.float32), images / "casetr_002_0002.nii.gz")
    with pytest.raises(ValueError, match=r"case 'casetr_002' has channel files _0000, _0001, _0002"):
        find_inputs([images])


# -- splits_final.json ---------------------------------------------------------------------


def test_splits_final_json_becomes_the_folds(tmp_path):
    ids = [f"case_{i}" for i in range(4)]
    splits = [{"train": ids[2:] + ids[1:2], "val": ids[:1]}, {"train": ids[:2], "val": ids[2:]}]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(splits))
    folds = load_or_create_splits(path, ids, "kfold", k=2)
    assert [(f.name, f.train_ids, f.test_ids) for f in folds] == [
        ("fold_0", sorted(splits[0]["train"]), ["case_0"]),
        ("fold_1", ["case_0", "case_1"], ["case_2", "case_3"]),
    ]
    assert json.loads(path.read_text()) == splits  # never rewritten


def test_splits_final_json_with_unknown_case_ids_names_the_file(tmp_path):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["zz"]}]))
    with pytest.raises(ValueError, match=r"splits_final\.json: fold 0 names case ids not in the dataset: \['zz'\]"):
        load_or_create_splits(path, ["a", "b", "c"], "kfold", k=1)
    with pytest.raises(ValueError, match=r"holds 1 nnU-Net folds but evaluation\.folds is 5"):
        load_or_create_splits(path, ["a", "b", "zz"], "kfold", k=5)


# -- medseg score ----------------------------------------------------------------------------


def numpy_dice(pred, ref, values):
    p, r = np.isin(pred, values), np.isin(ref, values)
    total = p.sum() + r.sum()
    return math.nan if total == 0 else 2.0 * (p & r).sum() / total


def test_score_folder_matches_numpy_and_nnunet_layout(tmp_path):
    dataset_json = make_raw(tmp_path, train=2)
    refs = dataset_json.parent / "labelsTr"
    rng = np.random.default_rng(1)
    preds = {}
    for ref in sorted(refs.iterdir()):
        truth = np.asarray(nib.load(ref).dataobj)
        pred = np.where(rng.random(truth.shape) < 0.1, rng.integers(0, 3, truth.shape), truth)
        save(pred.astype(np.uint8), tmp_path / "pred" / ref.name)
        preds[ref.name] = (pred, truth)
    out = tmp_path / "scores"
    assert main(["score", str(tmp_path / "pred"), str(refs), "--labels", str(dataset_json),
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"metric_per_case", "mean", "foreground_mean"}
    structures = {"1": [1], "2": [2], "kidney": [1, 2], "tumor": [2]}
    for entry in summary["metric_per_case"]:
        pred, truth = preds[Path(entry["reference_file"]).name]
        assert Path(entry["prediction_file"]).name == Path(entry["reference_file"]).name
        for name, values in structures.items():
            m = entry["metrics"][name]
            p, r = np.isin(pred, values), np.isin(truth, values)
            assert m["Dice"] == pytest.approx(numpy_dice(pred, truth, values))
            assert m["IoU"] == pytest.approx((p & r).sum() / (p | r).sum())
            assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (
                (p & r).sum(), (p & ~r).sum(), (~p & r).sum(), (~p & ~r).sum()
            )
            assert (m["n_pred"], m["n_ref"]) == (p.sum(), r.sum())
    for name, values in structures.items():
        dices = [numpy_dice(*preds[k], values) for k in sorted(preds)]
        assert summary["mean"][name]["Dice"] == pytest.approx(np.mean(dices))
    assert summary["foreground_mean"]["Dice"] == pytest.approx(
        np.mean([summary["mean"]["1"]["Dice"], summary["mean"]["2"]["Dice"]])
    )
    with open(out / "scores.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    row = next(r for r in rows if r["case_id"] == "casetr_000" and r["structure"] == "kidney"
               and r["metric"] == "Dice")
    assert float(row["value"]) == pytest.approx(numpy_dice(*preds["casetr_000.nii.gz"], [1, 2]))


def test_score_prediction_without_reference_is_named(tmp_path):
    save(np.zeros(SHAPE, np.uint8), tmp_path / "gt" / "a.nii.gz")
    save(np.zeros(SHAPE, np.uint8), tmp_path / "pred" / "b.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"prediction .*b\.nii\.gz has no reference"):
        score_folder(tmp_path / "pred", tmp_path / "gt")


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_score_grid_mismatch_is_named(tmp_path, what):
    save(np.ones(SHAPE, np.uint8), tmp_path / "gt" / "a.nii.gz")
    if what == "shape":
        save(np.ones((16, 32, 30), np.uint8), tmp_path / "pred" / "a.nii.gz")
        match = r"a\.nii\.gz has shape \(16, 32, 30\) but its reference"
    else:
        save(np.ones(SHAPE, np.uint8), tmp_path / "pred" / "a.nii.gz", np.diag([4, 2, 3, 1.0]))
        match = r"a\.nii\.gz has another affine than its reference"
    with pytest.raises(ValueError, match=match):
        score_folder(tmp_path / "pred", tmp_path / "gt")
    assert not (tmp_path / "pred" / "summary.json").exists()


# -- end to end: build, train, predict _0000/_0001 files, score ------------------------------


@pytest.mark.slow
def test_build_train_predict_and_score(tiny_config, tmp_path):
    from medseg_datasets.nnunet_raw import read_dataset_json
    from medseg_datasets.nnunet_raw.nnunet_raw_dataset_builder import read_channels

    from medseg import datasets
    from medseg.config import InferenceConfig
    from medseg.inference import predict_case
    from medseg.inference.sliding_window import SlidingWindow
    from medseg.workflows.experiment import prediction_plan, prepare_data, train_model

    dataset_json = make_raw(tmp_path, train=4, test=2)
    data_dir = tmp_path / "tfds"
    builder = datasets.prepare("nnunet_raw", str(dataset_json), str(data_dir))
    assert dict(builder.info.splits)["train"].num_examples == 4
    assert builder.info.metadata["regions"] == {"kidney": [1, 2]}
    assert builder.info.features["image"].shape == (None, None, None, 2)

    config = tiny_config(**{
        "data.dataset": "nnunet_raw", "data.config": str(dataset_json),
        "data.data_dir": str(data_dir), "preprocess.normalize": "image",
        "preprocess.clip": "none",
    })
    setup = prepare_data(config)
    model, _ = train_model(setup.config, setup)
    plan = prediction_plan(setup.config, setup)

    images = dataset_json.parent / "imagesTs"
    cases = find_inputs([images])
    assert [c for c, _ in cases] == ["casets_000", "casets_001"]
    # medseg predict groups the _0000/_0001 files of each case into one 2-channel image
    model.save(tmp_path / "model.keras")
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "pred"
    assert main(["predict", str(images), "--model", str(tmp_path / "model.keras"),
                 "--plan", str(tmp_path / "plan.json"), "--output", str(out),
                 "--postprocessing", "none"]) == 0
    # the same as predicting the stacked channels directly
    config_raw = read_dataset_json(dataset_json)
    window = SlidingWindow.from_plan(plan, InferenceConfig())
    for case_id, paths in cases:
        record = read_channels(case_id, list(paths), None, config_raw)
        labels, _ = predict_case(
            [model], record.image, record.spacing, plan.preprocess, plan.patch_size,
            len(plan.class_names), probabilities=False, window=window,
        )
        written = nib.load(out / f"{case_id}_seg.nii.gz")
        np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
        np.testing.assert_allclose(written.affine, nib.load(paths[0]).affine, atol=1e-5)

    refs = dataset_json.parent / "labelsTs"
    assert main(["score", str(out), str(refs), "--labels", str(dataset_json)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2
    for entry in summary["metric_per_case"]:
        pred = np.asarray(nib.load(entry["prediction_file"]).dataobj)
        ref = np.asarray(nib.load(entry["reference_file"]).dataobj)
        assert Path(entry["reference_file"]).name == Path(entry["prediction_file"]).name.replace(
            "_seg", ""
        )
        for name, values in {"1": [1], "2": [2], "kidney": [1, 2]}.items():
            expected = numpy_dice(pred, ref, values)
            got = entry["metrics"][name]["Dice"]
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_dummy_data_builds_with_regions(tmp_path):
    from medseg import datasets

    dataset_json = (
        Path(__file__).parents[1] / "datasets/nnunet_raw/dummy_data/Dataset001_Dummy/dataset.json"
    )
    builder = datasets.prepare("nnunet_raw", str(dataset_json), str(tmp_path))
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert splits == {"train": 2, "test": 1}
    assert builder.info.metadata["class_names"] == ["background", "label_1", "tumor"]
    assert builder.info.metadata["regions"] == {"kidney": [1, 2]}
    (example,) = builder.as_dataset(split="train[:1]").as_numpy_iterator()
    ref = dataset_json.parent / "imagesTr"
    for c in range(2):
        expected = np.asarray(nib.load(ref / f"case_000_{c:04d}.nii.gz").dataobj)
        np.testing.assert_array_equal(example["image"][..., c], expected)
