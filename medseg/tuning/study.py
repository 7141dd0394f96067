"""Optuna studies over the medseg config, every trial a nested MLflow run.

A study lives in an RDB storage (``tune.storage``: sqlite under ``mlruns/`` by default, any
SQLAlchemy URL). Its MLflow run is created once and its id kept as the study's user
attribute ``mlflow_run_id``; every worker, in this process or another, attaches its trials
to that run as nested runs. Workers stop when the study holds ``tune.n_trials`` finished
trials (:func:`finished_trials`), so running ``medseg tune`` again resumes an interrupted
study.

A running trial beats a heartbeat into the storage. A worker that dies (SIGKILL, OOM, a lost
machine) stops beating; once its grace period is over, the next worker to start a trial, or
the last worker before it stops, fails that trial, closes its MLflow run as FAILED and queues
it once more while the study is short of ``tune.n_trials``. The retry resumes from the dead
trial's checkpoints (``train.checkpoint_dir``), which are its own: every trial has a folder
named after its number, so two trials drawing the same values never share checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import optuna
import sqlalchemy
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from medseg.config import Config, ConfigError, TuneConfig, redact
from medseg.tracking.lineage import git_state
from medseg.tracking.run import run_training
from medseg.tracking.store import check_reachable, configure, resolve_tracking_uri
from medseg.tuning.plots import log_study_plots
from medseg.tuning.pruning import DicePruningCallback
from medseg.tuning.space import parse_space, suggest_overrides
from medseg.workflows.experiment import ExperimentResult

log = logging.getLogger(__name__)

STUDY_RUN_ATTR = "mlflow_run_id"
MEAN_CASE_DICE = "val_case_dice_mean"
# MLflow tags of a trial's run
TAG_STUDY = "optuna.study_name"
TAG_TRIAL = "optuna.trial_number"
TAG_STATE = "optuna.state"
TAG_ERROR = "optuna.error"
TAG_WORKER = "optuna.worker"
_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# A running trial's heartbeat, in seconds. The grace period must outlast a heartbeat stuck
# behind sqlite's 60 s lock wait (_storage) plus an interval, or a live trial is failed.
HEARTBEAT_INTERVAL = 30
GRACE_PERIOD = 120
MAX_RETRY = 1  # a trial that killed its worker (OOM?) is tried once more, not forever
DEAD_WORKER = "its worker stopped before the trial ended (killed?): no heartbeat"


@dataclass
class TuneResult:
    """What a finished ``tune`` call leaves behind."""

    study_name: str
    storage: str
    study_run_id: str
    trials: list[dict[str, Any]]  # number, state, value, params, mlflow_run_id, error
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_config: Path | None = None  # the best trial's train config (JSON)


JOURNAL = "journal:///"  # Optuna's journal file, for sites without a database server


def resolve_storage(url: str) -> str:
    """A relative ``sqlite:///`` or ``journal:///`` storage made absolute (one file for
    every process), its folder created."""
    if url.startswith(JOURNAL) and not url.startswith(JOURNAL + "/"):
        url = JOURNAL + str((Path.cwd() / url[len(JOURNAL) :]).resolve())
    url = resolve_tracking_uri(url) if url.startswith("sqlite:") else url
    for prefix in ("sqlite:///", JOURNAL):
        if url.startswith(prefix):
            Path(url[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
    return url


def _rdb_storage(url: str, heartbeat: dict, attempts: int = 3) -> optuna.storages.RDBStorage:
    """An RDBStorage on a database server. Workers started together on a new database
    race to create Optuna's tables (PostgreSQL: "duplicate key value violates unique
    constraint pg_type_typname_nsp_index"); the loser retries, and then finds them made."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _storage(url: str, on_dead_trial=None) -> optuna.storages.BaseStorage:
    """The study's storage: an RDB with heartbeats, ``on_dead_trial(study, trial)`` called
    (in a live worker) for each trial failed because its worker stopped beating; or, for a
    ``journal:///path`` URL, Optuna's append-only journal file (no heartbeats: a killed
    worker's trial stays RUNNING).

    Raises
    ------
    ServerUnreachable
        If a database server does not answer (in seconds, its URL's password hidden).
    """
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len(JOURNAL) - 1 :]))
    check_reachable(url, "tune.storage")
    heartbeat = {
        "heartbeat_interval": HEARTBEAT_INTERVAL,
        "grace_period": GRACE_PERIOD,
        "heartbeat_stale_trial_callback": on_dead_trial,
    }
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not url.startswith("sqlite"):
            return _rdb_storage(url, heartbeat)
        # workers write concurrently: wait for sqlite's lock rather than fail at once. And
        # sqlite has no SELECT ... FOR UPDATE: two workers could both read a queued trial as
        # WAITING and both run it. Every transaction therefore takes the write lock when it
        # begins (BEGIN IMMEDIATE; SQLAlchemy's pysqlite recipe), which makes Optuna's
        # read-then-update of a trial's state atomic across processes.
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60, "isolation_level": None}},
            **heartbeat,
        )

    @sqlalchemy.event.listens_for(storage.engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return storage


PRUNERS = ("median", "percentile", "hyperband", "none")
SAMPLERS = ("tpe", "random")


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    """The Optuna pruner ``tune.pruner`` names, with the ``tune.pruner_*`` settings.

    Raises
    ------
    ConfigError
        Naming ``tune.pruner`` and the allowed names, for any other name.
    """
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.pruner_startup_trials, n_warmup_steps=tune.pruner_warmup_epochs
        )
    if tune.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            tune.pruner_percentile,
            n_startup_trials=tune.pruner_startup_trials,
            n_warmup_steps=tune.pruner_warmup_epochs,
        )
    if tune.pruner == "hyperband":
        # resources are epochs; the largest is read from the first trial that ends
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.pruner_warmup_epochs))
    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(
        f"tune.pruner={tune.pruner!r} is not one of {', '.join(map(repr, PRUNERS))}"
    )


def make_sampler(tune: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``tune.sampler`` names, seeded with ``seed``.

    Raises
    ------
    ConfigError
        Naming ``tune.sampler`` and the allowed names, for any other name.
    """
    if tune.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(
        f"tune.sampler={tune.sampler!r} is not one of {', '.join(map(repr, SAMPLERS))}"
    )


def open_study(config: Config, worker: int = 0) -> optuna.Study:
    """Create or load the study ``tune.study_name`` in ``tune.storage``.

    The sampler (``tune.sampler``) is seeded with ``seed + worker``, so workers draw
    different trials and a single worker's study repeats.
    """
    tune = config.tune
    if tune.direction not in ("maximize", "minimize"):
        raise ConfigError(f"tune.direction={tune.direction!r}: use 'maximize' or 'minimize'")
    parse_space(tune.space)  # fail before any worker starts
    sampler, pruner = make_sampler(tune, config.seed + worker), make_pruner(tune)
    study = optuna.create_study(
        storage=_storage(resolve_storage(tune.storage), _DeadTrials(config)),
        study_name=tune.study_name,
        direction=tune.direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if study.direction.name.lower() != tune.direction:
        raise ConfigError(
            f"study {tune.study_name!r} in {tune.storage} exists with direction "
            f"{study.direction.name.lower()}, not tune.direction={tune.direction!r}"
        )
    return study


def load_study(config: Config) -> optuna.Study:
    """The existing study ``tune.study_name`` of ``tune.storage``, as stored now."""
    return optuna.load_study(
        study_name=config.tune.study_name, storage=_storage(resolve_storage(config.tune.storage))
    )


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that reached an outcome: COMPLETE, PRUNED, or FAIL from an error of
    their own (recorded as their ``error`` attribute).

    These count toward ``tune.n_trials``; a trial whose worker died or was interrupted
    did not reach one, and the study runs another in its place.
    """
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        or (t.state == optuna.trial.TrialState.FAIL and "error" in t.user_attrs)
    ]


def _close_run(
    client: MlflowClient, run_id: str, state: str, error: str | None = None, status=None
) -> None:
    """End a trial's MLflow run with its trial's state (and why it failed)."""
    if error is not None:
        client.set_tag(run_id, TAG_ERROR, error[:4000])
    client.set_tag(run_id, TAG_STATE, state)
    client.set_terminated(run_id, status or _RUN_STATUS[state])


class _DeadTrials:
    """Called by the storage, in a live worker, for each trial failed because its worker
    stopped beating: closes the trial's MLflow run (the dead process cannot) and queues the
    trial once more (``MAX_RETRY``) while the study is short of ``tune.n_trials``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        worker = trial.user_attrs.get("worker", "unknown")
        message = f"{DEAD_WORKER} for {GRACE_PERIOD} s (worker {worker})"
        log.warning("study %s trial %d: %s", study.study_name, trial.number, message)
        run_id = trial.user_attrs.get(STUDY_RUN_ATTR)
        if run_id:
            try:
                uri = resolve_tracking_uri(self.config.tracking.tracking_uri)
                _close_run(MlflowClient(uri), run_id, "FAIL", message)
            except Exception as err:  # the study's end closes it (_close_trial_runs)
                log.warning("could not close MLflow run %s of trial %d: %s", run_id,
                            trial.number, err)
        if len(finished_trials(study)) < self.config.tune.n_trials:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.retry(study, trial)


def _silent_trials(study: optuna.Study, seconds: int) -> list[int]:
    """Ids of the RUNNING trials whose last heartbeat is more than ``seconds`` old."""
    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache
    grace = storage.grace_period
    storage.grace_period = seconds  # the storage's own query, with another threshold
    try:
        return storage._get_stale_trial_ids(study._study_id)
    finally:
        storage.grace_period = grace


def fail_dead_trials(study: optuna.Study) -> int:
    """Fail the trials whose worker stopped beating, waiting out their grace period.

    Runs when a worker is done: a trial that missed two heartbeats is watched until it
    beats again (a stalled but live worker) or its grace period is over, and then failed
    (closing its MLflow run and queuing its retry, see ``_DeadTrials``). Trials of live
    workers are left to them.

    Returns
    -------
    int
        How many trials were failed.
    """
    if not isinstance(study._storage, optuna.storages._heartbeat.BaseHeartbeat):
        return 0  # a journal file: no heartbeats to miss
    interval = study._storage.get_heartbeat_interval()
    silent = _silent_trials(study, 2 * interval)
    if not silent:
        return 0
    log.warning("trials %s have missed heartbeats: waiting up to %d s to fail them", silent,
                GRACE_PERIOD)
    deadline = time.monotonic() + GRACE_PERIOD + interval
    running = set(silent)
    while running and time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        running &= set(_silent_trials(study, 2 * interval))
        if running:
            time.sleep(interval)
    states = [study._storage.get_trial(t).state for t in silent]
    return sum(s == optuna.trial.TrialState.FAIL for s in states)


def _public_url(url: str) -> str:
    """A storage URL without its password, fit for a tag."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# How long a process waits for another one creating the study's MLflow run, in seconds (a
# few MLflow calls; longer means the holder hangs)
STUDY_LOCK_TIMEOUT = 120


def _lock_key(study_name: str) -> int:
    """The PostgreSQL advisory-lock key (signed 64 bit) of a study's MLflow run."""
    digest = hashlib.sha256(f"medseg study run {study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _study_run_lock(config: Config) -> Iterator[bool]:
    """Hold the lock under which one process looks for, or makes, the study's MLflow run;
    yield whether anything is locked.

    On PostgreSQL a session advisory lock on the storage's database: processes on any
    machine that open a new study in the same instant take turns, and the server drops the
    lock with its holder's connection, so a killed process never blocks the next. Other
    storages lock nothing (:func:`study_run` then converges on the attribute's last writer).

    Raises
    ------
    RuntimeError
        If another process holds the lock for ``STUDY_LOCK_TIMEOUT`` seconds.
    """
    url = resolve_storage(config.tune.storage)
    if not url.startswith("postgresql"):
        yield False
        return
    key = {"key": _lock_key(config.tune.study_name)}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            # lock_timeout bounds the wait for an advisory lock too
            connection.exec_driver_sql(f"SET lock_timeout = '{STUDY_LOCK_TIMEOUT}s'")
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
            except sqlalchemy.exc.OperationalError:
                raise RuntimeError(
                    f"tune.storage={redact(url)}: another process has been creating the MLflow "
                    f"run of study {config.tune.study_name!r} for {STUDY_LOCK_TIMEOUT} s (a "
                    "hung medseg tune?); stop it, or run again"
                ) from None
            try:
                yield True
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)
    finally:
        engine.dispose()


def study_run(study: optuna.Study, config: Config, run_id: str | None = None) -> str:
    """The id of the study's MLflow run, creating (or adopting ``run_id``) on first use.

    Processes opening a new study at the same moment make one run between them: on
    PostgreSQL under a lock (:func:`_study_run_lock`); elsewhere each makes one, the
    attribute's last writer wins and the others delete theirs.
    """
    existing = study.user_attrs.get(STUDY_RUN_ATTR)
    if existing:
        return existing
    with _study_run_lock(config) as locked:
        existing = study.user_attrs.get(STUDY_RUN_ATTR)  # made while this process waited?
        if existing:
            return existing
        experiment_id = configure(config)
        client = MlflowClient(mlflow.get_tracking_uri())
        tags = {
            TAG_STUDY: study.study_name,
            "optuna.storage": _public_url(resolve_storage(config.tune.storage)),
            "optuna.direction": config.tune.direction,
            **git_state(),
        }
        created = run_id is None
        if created:
            run_id = client.create_run(
                experiment_id, run_name=f"study-{study.study_name}", tags=tags
            ).info.run_id
        else:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
        for key, value in config.to_flat_dict(redacted=True).items():
            if key.startswith(("tune.", "tracking.")) or key == "seed":
                client.log_param(run_id, key, json.dumps(value) if isinstance(value, list) else value)
        study.set_user_attr(STUDY_RUN_ATTR, run_id)
    if locked:
        return run_id
    # unlocked, another process may have raced us; the last writer wins, the rest adopt it
    winner = load_study(config).user_attrs[STUDY_RUN_ATTR]
    if winner != run_id and created:
        client.delete_run(run_id)
    return winner


def objective_value(result: ExperimentResult, metrics: dict[str, float], name: str) -> float:
    """The number a trial returns: the mean whole-case Dice over foreground classes, or a
    metric of the trial's run.

    Raises
    ------
    KeyError
        If ``name`` is neither ``val_case_dice_mean`` nor a metric of the run.
    """
    if name == MEAN_CASE_DICE:
        means = [
            result.summary[f"dice_{c}"]["mean"]
            for c in result.data.class_names[1:]
            if f"dice_{c}" in result.summary
        ]
        finite = [m for m in means if math.isfinite(m)]
        return float(np.mean(finite)) if finite else math.nan
    if name not in metrics:
        raise KeyError(f"tune.metric={name!r} is not a metric of the run ({', '.join(metrics)})")
    return float(metrics[name])


def _checkpoint_dir(config: Config, trial: optuna.Trial) -> str | None:
    """The trial's own checkpoint folder under ``train.checkpoint_dir`` (None without one).

    Named after the trial's number (a retry: the number of the trial it retries, so it
    resumes from that trial's checkpoints): two trials that draw the same values, which the
    config hash of ``checkpoint_directory`` cannot tell apart, never resume from or prune
    each other's checkpoints.
    """
    if not config.train.checkpoint_dir:
        return None
    number = trial.storage.get_trial_system_attrs(trial._trial_id).get(
        "failed_trial", trial.number
    )
    study = re.sub(r"[^\w.-]", "_", trial.study.study_name)  # a folder name
    return str(Path(config.train.checkpoint_dir) / f"{study}-trial-{number:04d}")


class _Objective:
    def __init__(self, config: Config, parent_run_id: str, worker: int = 0) -> None:
        self.config = config
        self.worker = worker
        self.params = parse_space(config.tune.space)
        self.parent_run_id = parent_run_id
        configure(config)
        self.client = MlflowClient(mlflow.get_tracking_uri())
        # trials nest in their study run's experiment (a notebook's run may be elsewhere)
        self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id

    def __call__(self, trial: optuna.Trial) -> float:
        tune = self.config.tune
        worker = f"{self.worker} (pid {os.getpid()})"
        trial.set_user_attr("worker", worker)  # who to blame when its heartbeat stops
        run_id = None
        state, error, status = "FAIL", None, None
        try:
            overrides = suggest_overrides(trial, self.params)
            run_id = self.client.create_run(
                self.experiment_id,
                run_name=f"{trial.study.study_name}-trial-{trial.number}",
                tags={
                    MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                    TAG_STUDY: trial.study.study_name,
                    TAG_TRIAL: str(trial.number),
                    TAG_STATE: "RUNNING",
                    "optuna.params": json.dumps(overrides),
                    TAG_WORKER: worker,
                },
            ).info.run_id
            trial.set_user_attr(STUDY_RUN_ATTR, run_id)
            config = self.config.with_overrides({**overrides, "tracking.run_name": None})
            trial.set_user_attr("config", config.to_dict(redacted=True))  # the user's checkpoint_dir
            checkpoints = _checkpoint_dir(config, trial)
            if checkpoints:
                config = config.with_overrides({"train.checkpoint_dir": checkpoints})
            callbacks = []
            if tune.pruner != "none":
                callbacks.append(DicePruningCallback(trial, tune.prune_metric))
            result, _ = run_training(config, run_id=run_id, callbacks=callbacks)
            metrics = self.client.get_run(run_id).data.metrics
            value = objective_value(result, metrics, tune.metric)
            if tune.metric == MEAN_CASE_DICE:
                self.client.log_metric(run_id, MEAN_CASE_DICE, value)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except Exception as err:
            error = redact(f"{type(err).__name__}: {err}")  # a URL in it keeps no password
            trial.set_user_attr("error", error)  # an outcome: counts toward n_trials
            raise
        except BaseException as err:  # Ctrl-C, SystemExit: no outcome, a resume reruns it
            error, status = f"interrupted ({type(err).__name__})", "KILLED"
            raise
        finally:
            try:
                if run_id is not None:
                    _close_run(self.client, run_id, state, error, status)
            finally:
                keras.backend.clear_session()  # trials share the process: free the graph


def _stop_when_finished(n_trials: int):
    """An ``optimize`` callback stopping the study once it holds ``n_trials`` finished
    trials (Optuna's ``MaxTrialsCallback``, counting :func:`finished_trials`)."""

    def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(finished_trials(study)) >= n_trials:
            study.stop()

    return stop


def _show_progress(quiet: bool, progress: bool) -> bool:
    """Optuna's progress bar: asked for, not quiet, and drawn on a terminal (in a log
    file or a notebook's captured output it is a wall of carriage returns)."""
    return progress and not quiet and sys.stderr.isatty()


def optimize(
    config: Config,
    worker: int = 0,
    study_run_id: str | None = None,
    quiet: bool = False,
    progress: bool = False,
) -> None:
    """Run trials of the study until it holds ``tune.n_trials`` finished trials (or
    ``tune.timeout`` passes).

    Optuna reports each trial's end ("Trial 3 finished with value ...") at INFO unless
    ``quiet``; with ``progress`` (one worker) and a terminal it also draws its progress bar.

    One worker; several may run this at once, in any processes, on the same storage.
    Failed trials are recorded (state FAIL, error in the trial's ``error`` attribute and
    its run's ``optuna.error`` tag) and the study goes on. A trial whose worker died is
    failed by this worker (:func:`fail_dead_trials`, before each trial and when done) and
    retried once while the study is short of ``tune.n_trials``.
    """
    tune = config.tune
    study = open_study(config, worker)
    parent = study_run(study, config, study_run_id)
    optuna.logging.set_verbosity(optuna.logging.WARNING if quiet else optuna.logging.INFO)
    deadline = None if tune.timeout is None else time.monotonic() + tune.timeout
    objective = None
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if len(finished_trials(study)) < tune.n_trials and (left is None or left > 0):
            objective = objective or _Objective(config, parent, worker)
            study.optimize(
                objective,
                n_trials=tune.n_trials,
                timeout=left,
                catch=(Exception,),
                callbacks=[_stop_when_finished(tune.n_trials)],
                gc_after_trial=True,
                show_progress_bar=_show_progress(quiet, progress),
            )
        # no worker may leave a dead one's trial RUNNING; its retry is run here
        if not fail_dead_trials(study) or len(finished_trials(study)) >= tune.n_trials:
            return


def _worker(config_json: str, worker: int, study_run_id: str, cwd: str, quiet: bool) -> None:
    os.chdir(cwd)
    optimize(Config.from_dict(json.loads(config_json)), worker, study_run_id, quiet=quiet)


def _error(trial: optuna.trial.FrozenTrial) -> str | None:
    if "error" in trial.user_attrs:
        return trial.user_attrs["error"]
    if trial.state == optuna.trial.TrialState.FAIL:  # no outcome of its own
        return f"{DEAD_WORKER} or interrupted (worker {trial.user_attrs.get('worker', '?')})"
    return None


def trial_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, params, MLflow run id and error."""
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "mlflow_run_id": t.user_attrs.get(STUDY_RUN_ATTR),
            "error": _error(t),
        }
        for t in sorted(study.trials, key=lambda t: t.number)
    ]


def export_best_config(study: optuna.Study, path: str | Path) -> Path:
    """Write the best trial's config as a train config (``medseg train --config PATH``).

    Raises
    ------
    ValueError
        If no trial of the study completed.
    """
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no completed trial yet")
    config = Config.from_dict(study.best_trial.user_attrs["config"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from medseg.io.atomic import write_atomically

    write_atomically(path, lambda tmp: config.save(tmp))
    return path


def _log_summary(client: MlflowClient, run_id: str, study: optuna.Study, best: Path | None):
    rows = trial_table(study)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.tsv"
        with table.open("w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["number", "state", "value", "params", "mlflow_run_id", "error"])
            for r in rows:
                writer.writerow(
                    [r["number"], r["state"], r["value"], json.dumps(r["params"]),
                     r["mlflow_run_id"], r["error"] or ""]
                )
        client.log_artifact(run_id, str(table), "tuning")
    if best is not None:
        client.log_artifact(run_id, str(best), "tuning")
        client.log_metric(run_id, "best_value", study.best_value)
        client.set_tag(run_id, "optuna.best_trial", str(study.best_trial.number))
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        client.log_metric(run_id, f"trials_{state.lower()}", sum(r["state"] == state for r in rows))


def _close_trial_runs(client: MlflowClient, parent: str, study: optuna.Study) -> None:
    """End the nested runs left RUNNING whose trial has ended (a dead worker's, when the
    worker that failed its trial could not reach MLflow); live trials' runs are left."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    for run in runs:
        trial = trials.get(int(run.data.tags.get(TAG_TRIAL, -1)))
        if trial is not None and trial.state.is_finished():
            _close_run(client, run.info.run_id, trial.state.name, _error(trial))


def tune(
    config: Config,
    workers: int | None = None,
    study_run_id: str | None = None,
    best_config: str | Path | None = None,
    quiet: bool = False,
) -> TuneResult:
    """Run (or resume) the study of ``config.tune`` with ``workers`` processes.

    When done, the study's run holds the trial table, the best config and the study's
    plots (``plots/*.png``: :func:`medseg.tuning.plots.log_study_plots`).

    Parameters
    ----------
    config : Config
        The base config; each trial overrides the keys of ``config.tune.space``.
    workers : int, optional
        Processes running trials at once (default ``config.tune.workers``); 1 runs them in
        this process.
    study_run_id : str, optional
        An open MLflow run to use as the study's run (e.g. a notebook's), when the study
        has none yet.
    best_config : path, optional
        Where the best trial's config goes (default
        ``<artifact_root>/tuning/<study>/best_config.json``); it is also logged to the
        study's run.
    quiet : bool
        Keep Optuna's per-trial INFO lines and its progress bar (one worker, a terminal)
        off.

    Returns
    -------
    TuneResult
    """
    workers = config.tune.workers if workers is None else workers
    if workers < 1:
        raise ConfigError(f"tune.workers={workers}: need at least 1")
    study = open_study(config)
    parent = study_run(study, config, study_run_id)
    status = RunStatus.FAILED
    try:
        result = _run_workers(config, workers, parent, best_config, quiet)
        status = RunStatus.FINISHED
        return result
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:  # never leave the study's run, or a trial's, RUNNING
        client = MlflowClient(mlflow.get_tracking_uri())
        try:
            _close_trial_runs(client, parent, load_study(config))
        except Exception as err:  # do not hide the error that brought us here
            log.warning("could not close the trial runs of study run %s: %s", parent, err)
        if study_run_id is None and client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, RunStatus.to_string(status))


def _run_workers(
    config: Config, workers: int, parent: str, best_config: str | Path | None, quiet: bool
) -> TuneResult:
    if workers == 1:
        optimize(config, 0, parent, quiet=quiet, progress=True)
        failed = []
    else:
        # spawn, not fork: TensorFlow's runtime does not survive a fork
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(
                target=_worker,
                args=(config.to_json(), i, parent, os.getcwd(), quiet),
                daemon=False,
            )
            for i in range(workers)
        ]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        failed = [i for i, p in enumerate(processes) if p.exitcode != 0]
        if failed:  # no worker is left to fail their trials: this process does
            fail_dead_trials(open_study(config))
    study = load_study(config)
    if best_config is None:
        best_config = Path(config.tracking.artifact_root) / "tuning" / study.study_name / (
            "best_config.json"
        )
    try:
        best_path = export_best_config(study, best_config)
    except ValueError:
        best_path = None
    client = MlflowClient(mlflow.get_tracking_uri())
    _log_summary(client, parent, study, best_path)
    log_study_plots(client, parent, study)  # never raises: a plot is not worth a study
    if failed:
        codes = [processes[i].exitcode for i in failed]
        finished = len(finished_trials(study))
        if finished < config.tune.n_trials:
            raise RuntimeError(
                f"tuning workers {failed} exited with codes {codes}; study "
                f"{study.study_name!r} holds {finished} of tune.n_trials="
                f"{config.tune.n_trials} finished trials: run medseg tune again to resume it"
            )
        log.warning("tuning workers %s exited with codes %s; the others finished the study",
                    failed, codes)
    best = study.best_trial if best_path is not None else None
    return TuneResult(
        study_name=study.study_name,
        storage=_public_url(resolve_storage(config.tune.storage)),
        study_run_id=parent,
        trials=trial_table(study),
        best_trial=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_config=best_path,
    )
