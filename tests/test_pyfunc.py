"""A logged model carries its plan: ``mlflow.pyfunc.load_model(uri).predict(nifti)`` in a
fresh process (no dataset, another cwd) segments exactly as ``medseg predict`` does, and so
does the model zip ``medseg export`` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.io import kits19_affine

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SPACING = (2.5, 0.8, 0.8)

# run in a fresh interpreter: loads the model with MLflow alone and saves what it predicts
SCRIPT = """
import sys
import numpy as np
import mlflow
import pandas as pd
from medseg.io import read_case

uri, tracking_uri, image, out = sys.argv[1:5]
if tracking_uri:
    mlflow.set_tracking_uri(tracking_uri)
model = mlflow.pyfunc.load_model(uri)
seg = model.predict(image)
listed = model.predict([image])
frame = model.predict(pd.DataFrame({"path": [image]}))
record = read_case("case", image)
arrays = model.predict({"image": record.image, "spacing": list(record.spacing)})
np.savez(out, seg=seg, listed=listed[0], frame=frame[0], arrays=arrays, n=len(listed))
"""


def fresh_process(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -c`` in an empty folder, no tracking URI and no TFDS data dir inherited."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "TFDS"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", TFDS_DATA_DIR=str(tmp_path / "no_dataset"))
    done = subprocess.run(
        [sys.executable, "-c", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "no_dataset").exists()  # nothing looked for a dataset
    return done


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    """A tiny training run whose model is logged with its plan, and a new NIfTI case."""
    import mlflow

    from medseg.tracking import run_training
    from medseg.tracking.model import log_model
    from medseg.workflows.experiment import prediction_plan

    root = tmp_path_factory.mktemp("pyfunc")
    config = tiny_config(**{
        "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
        "tracking.artifact_root": str(root / "mlruns"),
        "tracking.experiment": "pyfunc",
        # logged below with its plan, as the observer does once it passes one
        "tracking.log_model": False,
    })
    result, run_id = run_training(config)
    plan = prediction_plan(result.config, result.data, result.postprocessing)
    mlflow.set_tracking_uri(config.tracking.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = log_model(result.model, plan=plan)
    image = (np.random.default_rng(1).normal(0, 100, (20, 40, 36)) + 40).astype(np.int16)
    source = root / "new_case.nii.gz"
    nib.save(nib.Nifti1Image(image, kits19_affine(SPACING)), source)
    # what the CLI writes, the reference every other way must equal
    out = root / "cli"
    assert main(["predict", "--model", f"runs:/{run_id}/model", "--tracking-uri",
                 config.tracking.tracking_uri, str(source), "--output", str(out)]) == 0
    expected = np.asarray(nib.load(out / "new_case_seg.nii.gz").dataobj)
    return config.tracking.tracking_uri, run_id, info, plan, source, expected


@pytest.mark.slow
def test_pyfunc_segments_like_medseg_predict_in_a_fresh_process(trained, tmp_path):
    import mlflow

    tracking_uri, run_id, info, plan, source, expected = trained
    assert expected.shape == nib.load(source).shape and expected.any()
    # a copy of the model folder, away from the run: it keeps its plan
    mlflow.set_tracking_uri(tracking_uri)
    copied = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    kept = json.loads((copied / "medseg" / "plan.json").read_text())
    assert kept == json.loads(json.dumps(plan.to_dict())) and kept["class_names"] == list(plan.class_names)
    for uri, store in ((str(copied), ""), (f"runs:/{run_id}/model", tracking_uri)):
        out = tmp_path / "pyfunc.npz"
        fresh_process(tmp_path, SCRIPT, uri, store, str(source), str(out))
        got = np.load(out)
        assert int(got["n"]) == 1
        for key in ("seg", "listed", "frame", "arrays"):
            assert np.array_equal(got[key], expected), (uri, key)


@pytest.mark.slow
def test_the_exported_zip_segments_like_medseg_predict_in_a_fresh_process(trained, tmp_path):
    tracking_uri, run_id, _, _, source, expected = trained
    bundle = tmp_path / "model.zip"
    assert main(["export", run_id, "--output", str(bundle), "--tracking-uri", tracking_uri]) == 0
    # the CLI and the Python API, in a process without the tracking store
    fresh_process(
        tmp_path,
        "import sys; from medseg.cli import main; sys.exit(main(sys.argv[1:]))",
        "predict", "--model", str(bundle), str(source), "--output", str(tmp_path / "zip_out"),
    )
    seg = np.asarray(nib.load(tmp_path / "zip_out" / "new_case_seg.nii.gz").dataobj)
    assert np.array_equal(seg, expected)
    record = json.loads((tmp_path / "zip_out" / "new_case_provenance.json").read_text())
    assert str(bundle.resolve()) in json.dumps(record)  # the zip, not its unpacked copy
    fresh_process(
        tmp_path,
        "import sys, numpy as np; from medseg.inference.bundle import Segmenter; "
        "np.save(sys.argv[3], Segmenter.from_bundle(sys.argv[1]).segment_file(sys.argv[2]))",
        str(bundle), str(source), str(tmp_path / "api.npy"),
    )
    assert np.array_equal(np.load(tmp_path / "api.npy"), expected)


@pytest.mark.slow
def test_the_pyfunc_model_still_loads_as_keras_with_its_hash_and_plan(trained):
    import hashlib

    import mlflow

    from medseg.tracking.model import SHA256_TAG, load_model, load_plan, source_run_id

    tracking_uri, run_id, info, plan, source, _ = trained
    uri = f"runs:/{run_id}/model"
    mlflow.set_tracking_uri(tracking_uri)
    spec = mlflow.models.get_model_info(info.model_uri)
    assert spec.flavors["python_function"]["loader_module"] == "medseg.tracking.pyfunc"
    assert spec.flavors["keras"]["save_exported_model"] is False
    model = load_model(uri, tracking_uri)  # the hash check passes
    assert source_run_id(uri, tracking_uri) == run_id
    assert load_plan(uri, tracking_uri) == plan
    with __import__("tempfile").TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=tmp))
        digest = hashlib.sha256((folder / "data" / "model.keras").read_bytes()).hexdigest()
    assert mlflow.get_run(run_id).data.tags[SHA256_TAG] == digest
    assert model.output_shape[-1] == len(plan.class_names)


@pytest.mark.slow
def test_bad_pyfunc_inputs_are_clear_errors(trained):
    import mlflow

    tracking_uri, run_id, *_ = trained
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    with pytest.raises(ValueError, match="pyfunc input must be a path"):
        model.predict(42)
    with pytest.raises(ValueError, match="must have 'image'"):
        model.predict({"image": np.zeros((4, 4, 4))})
    with pytest.raises(ValueError, match="expected a \\(D, H, W\\[, C\\]\\) image and 3 spacings"):
        model.predict({"image": np.zeros((4, 4, 4)), "spacing": [1.0, 1.0]})
