"""Executing parameterized notebooks with papermill, each inside its own MLflow run.

The runner opens the run first and hands its id to the notebook as the ``run_id``
parameter, so the notebook logs into that run; afterwards the executed notebook itself is
logged to the same run, whether it succeeded or failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import papermill
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from medseg.config import TrackingConfig, redact
from medseg.io.atomic import write_atomically
from medseg.progress import papermill_progress
from medseg.tracking.lineage import source_tags
from medseg.tracking.store import (
    configure,
    resolve_tracking_uri,
    set_tracking_uri,
    tracking_from_environment,
)

OUTPUT_DIR = Path("mlruns") / "notebooks"


def run_notebook(
    notebook: str | Path,
    parameters: dict[str, Any] | None = None,
    tracking: TrackingConfig | None = None,
    output: str | Path | None = None,
    kernel_name: str = "python3",
    log_output: bool = False,
) -> tuple[Path, str]:
    """Execute ``notebook`` with papermill inside a new MLflow run.

    Parameters
    ----------
    notebook : path
        A notebook with a cell tagged ``parameters`` that accepts ``run_id`` and
        ``tracking_uri``.
    parameters : dict
        Values injected after the ``parameters`` cell.
    output : path, optional
        Where the executed notebook goes (default ``mlruns/notebooks/<name>-<run id>.ipynb``).

    Returns
    -------
    output : Path
        The executed notebook.
    run_id : str
        The MLflow run it logged to.

    Raises
    ------
    papermill.PapermillExecutionError
        If a cell fails; the run is then marked FAILED and the partial notebook is logged.
    """
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist")
    # MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME for what the caller left at defaults
    tracking = tracking_from_environment(tracking or TrackingConfig())
    experiment_id = configure(tracking)
    uri = resolve_tracking_uri(tracking.tracking_uri)
    client = MlflowClient(uri)
    run = client.create_run(
        experiment_id,
        run_name=f"{notebook.stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        # MLflow's source tags name the notebook (the run's observer keeps them)
        tags={
            "medseg.notebook": notebook.name,
            **source_tags(),
            "mlflow.source.name": str(notebook.resolve()),
            "mlflow.source.type": "NOTEBOOK",
        },
    )
    run_id = run.info.run_id
    if output is None:
        output = OUTPUT_DIR / f"{notebook.stem}-{run_id}.ipynb"
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    params = dict(parameters or {})
    params.update(run_id=run_id, tracking_uri=uri)
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=params,
            kernel_name=kernel_name,
            cwd=os.getcwd(),
            log_output=log_output,
            # papermill's cell bar on a terminal, unless quiet (medseg.progress)
            progress_bar=papermill_progress(),
        )
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    finally:
        if output.exists():
            # the injected parameters cell holds the tracking URI (and whatever else was
            # passed): no password leaves this process, on disk or in the store
            write_atomically(output, lambda tmp: tmp.write_text(redact(output.read_text())))
            client.log_artifact(run_id, str(output), "notebooks")
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id)  # a notebook that never opened the run
    return output, run_id


@contextmanager
def notebook_run(
    run_id: str | None, tracking_uri: str, experiment: str = "medseg", run_name: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run a notebook logs into, active inside the ``with`` block.

    Under ``medseg run`` that is the run the runner opened (``run_id``; the runner then logs
    the executed notebook into it); a notebook run by hand gets a new run of ``experiment``.
    """
    experiment_id = configure(TrackingConfig(tracking_uri=tracking_uri, experiment=experiment))
    start = {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": run_name}
    with mlflow.start_run(**start) as run:
        yield run


def newest_model_uri(tracking_uri: str, experiment: str = "medseg") -> str:
    """``runs:/<run id>/model`` of the newest model logged in ``experiment``.

    Raises
    ------
    ValueError
        If the experiment holds no logged model.
    """
    tracking = tracking_from_environment(
        TrackingConfig(tracking_uri=tracking_uri, experiment=experiment)
    )
    uri, experiment = resolve_tracking_uri(tracking.tracking_uri), tracking.experiment
    set_tracking_uri(uri)
    found = MlflowClient(uri).get_experiment_by_name(experiment)
    models = []
    if found is not None:
        models = mlflow.search_logged_models(
            experiment_ids=[found.experiment_id],
            order_by=[{"field_name": "creation_time", "ascending": False}],
            max_results=1,
            output_format="list",
        )
    if not models or not models[0].source_run_id:
        raise ValueError(f"experiment {experiment!r} in {redact(uri)} has no logged model; train one first")
    return f"runs:/{models[0].source_run_id}/{models[0].name}"
