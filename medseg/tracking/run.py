"""Running an experiment inside an MLflow run and recording its whole lineage."""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from medseg.config import Config
from medseg.evaluation.visuals import (
    plot_learning_curves,
    plot_metric_boxplots,
    write_overlay_gif,
    write_slice_montage,
)
from medseg.experiment import ExperimentResult, network_stride, prepare_data, run_experiment
from medseg.inference import PredictionPlan
from medseg.tracking.store import configure
from medseg.training import (
    describe_devices,
    describe_strategy,
    is_chief,
    make_strategy,
    precision_policy,
)

PACKAGES = ("medseg", "tensorflow", "keras", "tensorflow-datasets", "numpy", "mlflow")


class MlflowMetrics(keras.callbacks.Callback):
    """Log Keras' epoch metrics to the active MLflow run, one step per epoch."""

    def on_epoch_end(self, epoch, logs=None):
        values = {k: float(v) for k, v in (logs or {}).items() if _finite(v)}
        if values:
            mlflow.log_metrics(values, step=epoch)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def git_state(path: Path | None = None) -> dict[str, str]:
    """The commit of the code and whether its tree had uncommitted changes."""
    cwd = path or Path.cwd()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(status)).lower()}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_signature(in_channels: int, num_classes: int) -> ModelSignature:
    """Tensor signature of a 3D segmentation model (any batch and spatial size)."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1, in_channels), "image")]),
        outputs=Schema(
            [TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1, num_classes), "probabilities")]
        ),
    )


def display_window(plan) -> tuple[float, float] | None:
    """Intensity window for overlays: the clip range widened, so the foreground's
    surroundings stay visible (for CT: fat dark, soft tissue grey, enhanced organs bright)."""
    if plan.clip is None:
        return None
    lo, hi = plan.clip
    width = hi - lo
    return (lo - width, hi + width / 2)


def log_dataset(setup) -> None:
    """Record the TFDS dataset as the run's input, its digest the fingerprint hash, so the
    UI's Datasets column shows which data (and which version of it) a run used."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # MLflow registers its local source twice and warns that the path is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source")
        source = resolve_dataset_source(str(setup.builder.data_dir))
    dataset = MetaDataset(
        source=source,
        name=setup.dataset_name,
        digest=setup.fingerprint_hash,
    )
    mlflow.log_input(dataset, context="training")


def plan_params(plan) -> dict[str, str]:
    """The experiment plan's own numbers as MLflow params (``plan.*`` beside the config)."""
    values = {
        "plan.strides": json.dumps([list(s) for s in plan.strides]),
        "plan.kernels": json.dumps([list(k) for k in plan.kernels]),
        "plan.widths": json.dumps(list(plan.widths)),
        "plan.memory_gb": f"{plan.memory_bytes / 1e9:.3f}",
        "plan.parameters": str(plan.parameters),
        "plan.gflop_per_step": f"{plan.flops_per_step / 1e9:.2f}",
        "plan.device_planned": plan.device,
    }
    if plan.probe:
        values["plan.seconds_per_step"] = f"{plan.probe['seconds_per_step']:.4f}"
        values["plan.conv_gflops"] = f"{plan.probe['conv_gflops']:.1f}"
    if plan.predicted_train_s is not None:
        values["plan.predicted_train_s"] = f"{plan.predicted_train_s:.0f}"
    return values


def log_plan(setup) -> None:
    """Log the experiment plan's numbers as params and its overrides as a tag."""
    plan = setup.experiment_plan
    if plan is None:
        return
    mlflow.log_params(plan_params(plan))
    mlflow.set_tag(
        "medseg.plan.overrides", ", ".join(sorted(setup.overrides)) or "none"
    )


def _write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def log_result(result: ExperimentResult, log_model: bool = True) -> None:
    """Log everything an experiment produced to the active run."""
    setup = result.data
    history = result.history
    summary_metrics = {}
    for key, stats in result.summary.items():
        for stat in ("mean", "median"):
            if _finite(stats.get(stat)):
                summary_metrics[f"val_case_{key}_{stat}"] = float(stats[stat])
    summary_metrics.update({f"time_{k}": v for k, v in result.timings.items()})
    mlflow.log_metrics(summary_metrics)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(result.config.to_json())
        # everything prediction needs besides the model (medseg predict --model runs:/...)
        plan = PredictionPlan.from_config(
            result.config, setup.plan, setup.class_names, stride=network_stride(result.config, setup)
        )
        (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
        if setup.experiment_plan is not None:
            # the experiment plan as it ran: medseg reproduce trains from it, never re-plans
            setup.experiment_plan.save(tmp / "experiment_plan.json")
            (tmp / "plan_overrides.json").write_text(json.dumps(setup.overrides, indent=2))
            mlflow.log_artifact(str(tmp / "experiment_plan.json"))
            mlflow.log_artifact(str(tmp / "plan_overrides.json"))
        (tmp / "fingerprint.json").write_text(json.dumps(setup.fingerprint, indent=2))
        (tmp / "split.json").write_text(
            json.dumps({"train": setup.train_ids, "validation": setup.val_ids}, indent=2)
        )
        epochs = max((len(v) for v in history.values()), default=0)
        keys = sorted(history)
        _write_tsv(
            tmp / "history.tsv",
            ["epoch", *keys],
            [[e, *(history[k][e] for k in keys)] for e in range(epochs)],
        )
        score_keys = sorted({k for c in result.cases for k in c.scores})
        _write_tsv(
            tmp / "validation_cases.tsv",
            ["case_id", *score_keys],
            [[c.case_id, *(c.scores.get(k, float("nan")) for k in score_keys)] for c in result.cases],
        )
        (tmp / "validation_summary.json").write_text(json.dumps(result.summary, indent=2))
        for name in ("config.json", "plan.json", "fingerprint.json", "split.json"):
            mlflow.log_artifact(str(tmp / name))
        mlflow.log_artifact(str(tmp / "history.tsv"), "training")
        mlflow.log_artifact(str(tmp / "validation_cases.tsv"), "evaluation")
        mlflow.log_artifact(str(tmp / "validation_summary.json"), "evaluation")
        if result.cases:
            plot_metric_boxplots([c.scores for c in result.cases], tmp / "metrics_boxplot.png")
            mlflow.log_artifact(str(tmp / "metrics_boxplot.png"), "plots")
        if epochs:
            plot_learning_curves(history, tmp / "learning_curve.png")
            mlflow.log_artifact(str(tmp / "learning_curve.png"), "plots")
        if result.example is not None:
            ex = result.example
            view = {
                "axis": result.config.evaluation.overlay_axis,
                "spacing": ex["spacing"],
                "window": display_window(setup.plan),
            }
            gif = tmp / f"overlay_{ex['case_id']}.gif"
            write_overlay_gif(gif, ex["image"], ex["truth"], ex["pred"], **view)
            montage = tmp / f"montage_{ex['case_id']}.png"
            write_slice_montage(montage, ex["image"], ex["truth"], ex["pred"], **view)
            mlflow.log_artifact(str(gif), "plots")
            mlflow.log_artifact(str(montage), "plots")

    if log_model:
        # the inference graph only: no optimizer and no medseg loss, so the logged model
        # loads wherever TensorFlow and Keras do, without medseg installed
        # (the full-resolution output only, with deep supervision)
        model = result.model
        inference = keras.Model(model.inputs, model.outputs[0], name=model.name)
        mlflow.keras.log_model(
            inference,
            name="model",
            signature=model_signature(
                int(inference.input_shape[-1]), int(inference.output_shape[-1])
            ),
            pip_requirements=[
                f"tensorflow=={metadata.version('tensorflow')}",
                f"keras=={keras.__version__}",
            ],
            registered_model_name=result.config.tracking.register_model,
        )


def run_training(
    config: Config,
    run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list[keras.callbacks.Callback] | tuple = (),
) -> tuple[ExperimentResult, str | None]:
    """Run one experiment inside an MLflow run (a new one, or ``run_id`` if given).

    ``callbacks`` are Keras callbacks called after the one logging epoch metrics to MLflow
    (e.g. Optuna's pruning). Returns the experiment's result and the run id.

    In a multi-worker run (``TF_CONFIG``) every worker trains, but only rank 0 opens an
    MLflow run and logs; the others return ``(result, None)``.
    """
    strategy = make_strategy(config.train.strategy)  # before any TF op (multi-worker)
    if not is_chief():
        return run_experiment(config, callbacks=list(callbacks)), None
    experiment_id = configure(config.tracking)
    start = {"run_id": run_id} if run_id else {
        "experiment_id": experiment_id,
        "run_name": config.tracking.run_name,
    }
    with mlflow.start_run(**start) as run:
        # plan first: the params logged are the values the run uses (MLflow params are
        # immutable, so they cannot be logged before the plan resolves them)
        started = time.perf_counter()
        setup = prepare_data(config)
        prepare_s = time.perf_counter() - started
        config = setup.config or config
        mlflow.log_params(
            {k: json.dumps(v) if isinstance(v, list | dict) else v
             for k, v in config.to_flat_dict().items()}
        )
        log_plan(setup)
        tags = {
            "medseg.devices": ", ".join(describe_devices()),
            "medseg.seed": str(config.seed),
            "medseg.deterministic": str(config.train.deterministic).lower(),
            "medseg.precision": precision_policy(config.train),
            **{f"medseg.{k}": v for k, v in describe_strategy(strategy).items()},
            **git_state(),
            **{f"version.{k}": v for k, v in package_versions().items()},
            **(extra_tags or {}),
        }
        mlflow.set_tags(tags)
        result = run_experiment(config, callbacks=[MlflowMetrics(), *callbacks], setup=setup)
        result.timings["prepare_s"] = prepare_s  # planning included
        mlflow.set_tags(
            {
                "dataset.name": setup.dataset_name,
                "dataset.version": str(setup.builder.info.version),
                "dataset.fingerprint_hash": setup.fingerprint_hash,
            }
        )
        log_dataset(setup)
        log_result(result, log_model=config.tracking.log_model)
        return result, run.info.run_id
