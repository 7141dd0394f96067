"""Re-running a logged run from its MLflow record, and saying how close the rerun came.

A run logged by :func:`medseg.tracking.run_training` holds its whole config (as params and
as the ``config.json`` artifact, seed included), the dataset's name, version and fingerprint
hash, the git commit and the package versions. :func:`reproduce` trains that config again
into a new run tagged ``medseg.reproduces=<original run id>``, warns about whatever of the
lineage differs now, and compares the final metrics.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medseg.config import Config, ConfigError
from medseg.tracking import names
from medseg.tracking.lineage import git_state, package_versions
from medseg.tracking.run import run_training
from medseg.tracking.store import resolve_tracking_uri

TAG_REPRODUCES = "medseg.reproduces"


class LineageWarning(UserWarning):
    """The code, packages or dataset of a rerun differ from the original run's."""


@dataclass
class MetricDifference:
    key: str
    original: float
    reproduced: float

    @property
    def difference(self) -> float:
        return self.reproduced - self.original


@dataclass
class Reproduction:
    """A rerun of ``original_run_id`` logged as ``run_id``."""

    original_run_id: str
    run_id: str
    differences: list[MetricDifference]
    warnings: list[str] = field(default_factory=list)

    def difference(self, key: str) -> float:
        """reproduced - original of metric ``key``."""
        for d in self.differences:
            if d.key == key:
                return d.difference
        raise KeyError(f"metric {key!r} is in neither run")

    def table(self) -> str:
        """The metric differences as an aligned text table."""
        width = max([len(d.key) for d in self.differences] + [6])
        lines = [f"{'metric':{width}s}  {'original':>10s}  {'reproduced':>10s}  {'difference':>10s}"]
        for d in self.differences:
            lines.append(
                f"{d.key:{width}s}  {d.original:10.4f}  {d.reproduced:10.4f}  {d.difference:+10.2e}"
            )
        return "\n".join(lines)


def recorded_config(run_id: str, tracking_uri: str) -> Config:
    """The config a run was trained with: its ``config.json`` artifact, else its params.

    Raises
    ------
    ConfigError
        If the run recorded neither, or they do not form a valid config.
    """
    tracking_uri = resolve_tracking_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=names.CONFIG, dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            return Config.from_file(path)
    except (MlflowException, OSError):
        pass  # an older run, or one logged elsewhere: rebuild from the params
    params = MlflowClient(tracking_uri).get_run(run_id).data.params
    known = Config().to_flat_dict()
    values = {k: v for k, v in params.items() if k in known}
    if not values:
        raise ConfigError(f"run {run_id} recorded no medseg config (no config.json, no params)")
    try:
        return Config().with_overrides(values)
    except ConfigError as err:
        raise ConfigError(f"run {run_id}: its recorded params are not a valid config: {err}") from err


def recorded_plan(run_id: str, tracking_uri: str, directory: str) -> Path | None:
    """Download the run's ``experiment_plan.json`` into ``directory``; None if it has none
    (a run from before plans were logged)."""
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=names.EXPERIMENT_PLAN, dst_path=directory,
            tracking_uri=tracking_uri,
        )
    except (MlflowException, OSError):
        return None
    return Path(path)


def lineage_differences(tags: dict[str, str], config: Config) -> list[str]:
    """What differs between a run's recorded lineage (its tags) and this machine now:
    code commit, uncommitted changes, package versions, dataset version and fingerprint."""
    notes = []
    now = git_state()
    commit = tags.get("git.commit")
    if commit and commit != now["git.commit"]:
        notes.append(f"code differs: the run used commit {commit}, now {now['git.commit']}")
    for when, dirty in (("the run's", tags.get("git.dirty")), ("today's", now["git.dirty"])):
        if dirty == "true":
            notes.append(f"code differs: {when} working tree had uncommitted changes")
    for name, version in package_versions().items():
        recorded = tags.get(f"version.{name}")
        if recorded and recorded != version:
            notes.append(f"package {name} differs: the run used {recorded}, now {version}")
    from medseg import datasets

    try:
        builder = datasets.get_builder(config.data.dataset, config.data.config, config.data.data_dir)
    except ValueError as err:
        return [*notes, f"dataset cannot be found: {err}"]
    version = tags.get("dataset.version")
    if version and version != str(builder.info.version):
        notes.append(f"dataset version differs: the run used {version}, now {builder.info.version}")
    recorded_hash = tags.get("dataset.fingerprint_hash")
    if recorded_hash and builder.is_prepared():
        try:
            current = datasets.fingerprint_hash(datasets.read_fingerprint(builder))
        except FileNotFoundError:
            current = "none"
        if current != recorded_hash:
            notes.append(
                f"dataset fingerprint differs: the run used {recorded_hash}, now {current}"
            )
    elif recorded_hash:
        notes.append(f"dataset {builder.info.full_name} is not built here; it will be built")
    return notes


def _final_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if not k.startswith("time_")}


def reproduce(
    run_id: str, tracking_uri: str | None = None, overrides: dict | list | None = None
) -> Reproduction:
    """Train the recorded config of run ``run_id`` again and compare the outcome.

    Parameters
    ----------
    run_id : str
        A run logged by :func:`medseg.tracking.run_training`.
    tracking_uri : str, optional
        Its store (default: the config's default, ``sqlite:///mlruns/mlflow.db``). The rerun
        is logged there, in the original's experiment.
    overrides : dict or list of str, optional
        Config changes (e.g. ``data.data_dir`` on another machine); each is a warning.

    Returns
    -------
    Reproduction
        The new run's id, the final metrics of both runs (timings left out) and the lineage
        warnings, which are also issued as :class:`LineageWarning`.
    """
    uri = resolve_tracking_uri(tracking_uri or Config().tracking.tracking_uri)
    client = MlflowClient(uri)
    try:
        original = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"run {run_id} is not in {uri}: {err.message}") from None
    config = recorded_config(run_id, uri)
    notes = []
    if overrides:
        changed = config.with_overrides(overrides)
        before, after = config.to_flat_dict(), changed.to_flat_dict()
        notes += [
            f"config differs: {k}={after[k]!r} (the run used {before[k]!r})"
            for k in after if after[k] != before[k]
        ]
        config = changed
    where = {
        "tracking.tracking_uri": uri,
        "tracking.experiment": client.get_experiment(original.info.experiment_id).name,
    }
    if config.train.checkpoint_dir and not (overrides and "train.checkpoint_dir" in str(overrides)):
        # the original's checkpoints would "resume" the finished run: train from scratch
        where["train.checkpoint_dir"] = None
    config = config.with_overrides(where)
    notes += lineage_differences(original.data.tags, config)
    for note in notes:
        warnings.warn(note, LineageWarning, stacklevel=2)

    name = original.data.tags.get("mlflow.runName", run_id)
    new = client.create_run(
        original.info.experiment_id,
        run_name=f"reproduce-{name}",
        tags={TAG_REPRODUCES: run_id, "medseg.reproduce.warnings": "\n".join(notes) or "none"},
    )
    with tempfile.TemporaryDirectory() as plan_dir:
        plan_file = recorded_plan(run_id, uri, plan_dir)
        if plan_file is not None and config.plan.mode != "none":
            # the recorded plan, never a new one: a run planned on a fast machine
            # reproduces with the same step counts on a slow one
            config = config.with_overrides({"plan.mode": str(plan_file)})
            client.set_tag(new.info.run_id, "medseg.reproduce.plan", f"runs:/{run_id}/experiment_plan.json")
        run_training(config, run_id=new.info.run_id)
    before, after = _final_metrics(client, run_id), _final_metrics(client, new.info.run_id)
    differences = [
        MetricDifference(k, before.get(k, math.nan), after.get(k, math.nan))
        for k in sorted(set(before) | set(after))
    ]
    result = Reproduction(run_id, new.info.run_id, differences, notes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metric_differences.tsv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["metric", "original", "reproduced", "difference"])
            writer.writerows([d.key, d.original, d.reproduced, d.difference] for d in differences)
        (Path(tmp) / "warnings.json").write_text(json.dumps(notes, indent=2))
        client.log_artifact(new.info.run_id, str(path), "reproduce")
        client.log_artifact(new.info.run_id, str(Path(tmp) / "warnings.json"), "reproduce")
    return result
