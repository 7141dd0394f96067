"""What a run is made of: code version, packages, devices, the dataset input and the plan."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import mlflow

from medseg.config import Config, redact
from medseg.training import describe_devices, describe_strategy, precision_policy

__all__ = [
    "PACKAGES",
    "dataset_tags",
    "git_state",
    "lineage_tags",
    "log_dataset",
    "log_plan",
    "package_versions",
    "plan_params",
    "source_tags",
]

# a batch scheduler's (or CI's) variable: the run is a job, not someone's terminal
JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "CI")

PACKAGES = ("medseg", "tensorflow", "keras", "tensorflow-datasets", "numpy", "mlflow")


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


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


def source_tags(path: Path | None = None) -> dict[str, str]:
    """MLflow's own source tags, so its UI's Source column says what ran and at which commit.

    ``mlflow.source.name`` is the entry point (``medseg train``; a notebook's path inside a
    Jupyter kernel; otherwise the script), ``mlflow.source.type`` ``NOTEBOOK``, ``JOB``
    (under a batch scheduler or CI: one of ``JOB_VARIABLES`` set) or ``LOCAL``, and the git
    commit (from :func:`git_state`), branch and ``origin`` URL when ``path`` (default: the
    working directory) is in a git checkout.
    """
    cwd = path or Path.cwd()
    argv = sys.argv or [""]
    script = Path(argv[0]).name
    if script == "medseg" or argv[0].endswith(os.path.join("medseg", "cli.py")):
        # the subcommand: the first argument that is not an option
        command = next((a for a in argv[1:] if not a.startswith("-")), "")
        name, kind = f"medseg {command}".strip(), "LOCAL"
    elif "ipykernel" in script or "ipykernel_launcher" in " ".join(argv[:2]):
        # Jupyter tells a kernel its notebook; papermill's runner names it itself
        name, kind = os.environ.get("JPY_SESSION_NAME", "notebook"), "NOTEBOOK"
    else:
        name, kind = argv[0] or "python", "LOCAL"
    if kind == "LOCAL" and any(os.environ.get(v) for v in JOB_VARIABLES):
        kind = "JOB"
    tags = {"mlflow.source.name": name, "mlflow.source.type": kind}
    commit = git_state(cwd)["git.commit"]
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
        if branch := _git(["rev-parse", "--abbrev-ref", "HEAD"], cwd):
            tags["mlflow.source.git.branch"] = branch
        if url := _git(["remote", "get-url", "origin"], cwd):
            tags["mlflow.source.git.repoURL"] = redact(url)
    return tags


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions



def lineage_tags(config: Config, strategy=None) -> dict[str, str]:
    """The tags every medseg run carries: devices, seed, determinism, precision, the
    distribution strategy (when given), the git state and the package versions."""
    tags = {
        "medseg.devices": ", ".join(describe_devices()),
        "medseg.seed": str(config.seed),
        "medseg.deterministic": str(config.train.deterministic).lower(),
        "medseg.precision": precision_policy(config.train),
    }
    if strategy is not None:
        tags.update({f"medseg.{k}": v for k, v in describe_strategy(strategy).items()})
    return {
        **tags,
        **git_state(),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }


def dataset_tags(setup) -> dict[str, str]:
    """The dataset's name, version and fingerprint hash."""
    return {
        "dataset.name": setup.dataset_name,
        "dataset.version": str(setup.builder.info.version),
        "dataset.fingerprint_hash": setup.fingerprint_hash,
    }


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
