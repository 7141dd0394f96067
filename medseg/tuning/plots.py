"""Pictures of a study (Optuna's matplotlib plots), logged to the study's MLflow run.

Four plots, each a PNG under ``plots/`` of the study's run: the optimization history, the
parameter importances, the parallel coordinates and the intermediate values (the per-epoch
values the pruner saw). They are drawn on matplotlib's Agg canvas whatever the session's
backend is, and a plot that cannot be drawn never fails the study: it is skipped with a
warning and the tag ``medseg.plot_failed.<name>``. Only ``optuna.visualization.matplotlib``
is used (its plotly twin needs plotly, which medseg does not install).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from medseg.tracking.artifacts import PLOT_FAILED_TAG

log = logging.getLogger(__name__)

PLOT_DIR = "plots"
PLOT_SKIPPED_TAG = "medseg.plot_skipped"
PLOTS = (
    "optimization_history",
    "param_importances",
    "parallel_coordinate",
    "intermediate_values",
)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def skip_reason(name: str, study: optuna.Study) -> str | None:
    """Why plot ``name`` of ``study`` would tell nothing (None: draw it).

    Importances need two completed trials and a parameter that varies among them (Optuna
    raises, or returns equal bars, otherwise); the other plots need one completed trial, and
    the intermediate values a trial that reported some (none does with ``tune.pruner=none``).
    """
    complete = _complete(study)
    if not complete:
        return "no trial of the study completed yet"
    if name == "param_importances":
        if len(complete) < 2:
            return f"importances need at least 2 completed trials, the study has {len(complete)}"
        varying = {
            key for t in complete for key in t.params
            if len({repr(u.params.get(key)) for u in complete}) > 1
        }
        if not varying:
            return "importances need a parameter that varies among the completed trials"
    if name == "intermediate_values" and not any(
        t.intermediate_values for t in study.get_trials(deepcopy=False)
    ):
        return "no trial reported intermediate values (tune.pruner='none' reports none)"
    return None


def _plotter(name: str) -> Callable:
    from optuna.visualization import matplotlib as plots  # never the plotly path

    return getattr(plots, f"plot_{name}")


def draw_plot(name: str, study: optuna.Study):
    """Draw plot ``name`` (one of `PLOTS`) of ``study`` as a matplotlib Figure.

    The figure belongs to pyplot (Optuna draws with it), so a notebook shows it inline;
    close it (``matplotlib.pyplot.close(figure)``) when done with it.

    Raises
    ------
    ValueError
        If ``name`` is not one of `PLOTS`.
    """
    if name not in PLOTS:
        raise ValueError(f"plot {name!r} is not one of {', '.join(PLOTS)}")
    with warnings.catch_warnings():
        # the matplotlib plots are "experimental" since Optuna 2.2: say so once, in the docs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = _plotter(name)(study)
    axes = axes.flat[0] if hasattr(axes, "flat") else axes  # several objectives: a grid
    figure = axes.figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    return figure


def save_plot(name: str, study: optuna.Study, path: Path) -> Path:
    """Draw plot ``name`` of ``study`` and write it to ``path`` (a PNG) on the Agg canvas,
    closing the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = draw_plot(name, study)
    try:
        FigureCanvasAgg(figure)  # Agg whatever pyplot's backend (a display, a notebook)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)  # pyplot keeps every figure alive until closed
    return path


def log_study_plots(client: MlflowClient, run_id: str, study: optuna.Study) -> dict[str, str]:
    """Log the `PLOTS` of ``study`` to MLflow run ``run_id`` as ``plots/<name>.png``.

    Never raises for a plot: one that would tell nothing is skipped (reason logged and
    tagged ``medseg.plot_skipped.<name>``), one that fails to draw or upload is skipped with
    a warning (tagged ``medseg.plot_failed.<name>``).

    Returns
    -------
    dict
        ``{name: "logged" | the reason it was skipped or failed}``.
    """
    outcome = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in PLOTS:
            try:
                reason = skip_reason(name, study)
                if reason is not None:
                    log.info("plot %s of study %s skipped: %s", name, study.study_name, reason)
                    client.set_tag(run_id, f"{PLOT_SKIPPED_TAG}.{name}", reason)
                    outcome[name] = reason
                    continue
                path = save_plot(name, study, Path(tmp) / f"{name}.png")
                client.log_artifact(run_id, str(path), PLOT_DIR)
                outcome[name] = "logged"
            except Exception as err:  # never BaseException: an interrupt still stops us
                reason = f"{type(err).__name__}: {err}"
                log.warning("plot %s of study %s could not be logged, the study goes on "
                            "without it: %s", name, study.study_name, reason)
                outcome[name] = reason
                try:
                    client.set_tag(run_id, f"{PLOT_FAILED_TAG}.{name}", reason[:4000])
                except Exception:  # MLflow itself is down: the warning above says it all
                    pass
    return outcome
