"""The ``medseg`` command line: build, info, plan, train, evaluate, predict, run, tune, reproduce, ui."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from medseg.config import Config, ConfigError, redact
from medseg.errors import TrainingDiverged

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build a dataset (TFDS download_and_prepare)")
    p.add_argument("dataset", help="dataset name, e.g. kits_phantom")
    p.add_argument("--config", help="builder config (e.g. tiny, small) or a .json config file")
    p.add_argument("--data-dir", help="TFDS data dir (default: TFDS's)")
    p.add_argument("--manual-dir", help="where a manually downloaded dataset lies (kits19, msd)")

    p = sub.add_parser("info", help="summarise a built dataset's fingerprint")
    p.add_argument("dataset")
    p.add_argument("--config")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true", help="print the raw fingerprint as JSON")

    p = sub.add_parser(
        "plan",
        help="fit spacing, patch, network, batch and training length to a dataset and this machine",
        description="Plan an experiment from the dataset's fingerprint and this machine "
        "(nnU-Net's rules; on a CPU, or with --time-budget, the planned network is timed "
        "here and the step count fitted to the budget). Example: "
        "medseg plan kits_phantom --config small --time-budget 8m --explain",
    )
    p.add_argument("dataset", help="dataset name, e.g. kits_phantom")
    p.add_argument("--config", help="builder config (e.g. small) or a .json config file")
    p.add_argument("--data-dir", help="TFDS data dir (default: TFDS's)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="GPU memory to plan for")
    p.add_argument("--time-budget", metavar="DURATION", help="training time, e.g. 10m, 90s")
    p.add_argument(
        "--preset", choices=("default", "resenc_m", "resenc_l"), default="default",
        help="plain U-Net (default) or nnU-Net's residual-encoder presets",
    )
    p.add_argument("--output", help="where plan.json is written (default: only printed)")
    p.add_argument("--explain", action="store_true", help="print every value with its rule")
    p.add_argument(
        "--no-probe", action="store_true",
        help="predict the step time from the conv throughput instead of timing the network",
    )

    p = sub.add_parser("train", help="train and evaluate one model, logged to MLflow")
    p.add_argument("--config", dest="config_file", help="a .json or .toml config file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")

    p = sub.add_parser(
        "evaluate", help="cross-validate (or hold out) by evaluation.protocol, fold runs nested"
    )
    p.add_argument("--config", dest="config_file", help="a .json or .toml config file")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. evaluation.protocol=kfold"
    )
    p.add_argument(
        "--resume", metavar="RUN_ID", help="continue an interrupted evaluation's parent run"
    )
    p.add_argument("--print-config", action="store_true", help="print the config and exit")

    p = sub.add_parser("run", help="execute a notebook with papermill inside an MLflow run")
    p.add_argument("notebook")
    p.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    p.add_argument("--tracking-uri", default=Config().tracking.tracking_uri)
    p.add_argument("--experiment", default=Config().tracking.experiment)
    p.add_argument("--output", help="where the executed notebook is written")
    p.add_argument("--quiet", action="store_true", help="do not stream the cells' output")

    p = sub.add_parser("predict", help="segment NIfTI files or DICOM series with a model")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="a .nii/.nii.gz file, a folder of them, or a DICOM series folder",
    )
    p.add_argument(
        "--model", action="append", default=[],
        help="a .keras file or an MLflow model URI (runs:/<run id>/model, models:/...); "
        "repeat it for an ensemble (probabilities averaged)",
    )
    p.add_argument(
        "--ensemble", metavar="JSON",
        help="a medseg evaluate run's ensemble.json: its fold models and its postprocessing",
    )
    p.add_argument("--plan", help="plan.json of the training run (default: the run's, for a URI)")
    p.add_argument("--output", required=True, help="folder for <case>_seg.nii.gz")
    p.add_argument(
        "--probabilities", action="store_true", default=Config().inference.save_probabilities,
        help="also write <case>_prob.nii.gz",
    )
    p.add_argument("--overlap", type=float, default=Config().inference.overlap)
    p.add_argument(
        "--weighting", choices=("gaussian", "mean"), default=Config().inference.weighting
    )
    p.add_argument("--mirror", action="store_true", help="test-time mirroring along all axes")
    p.add_argument("--batch-size", type=int, default=Config().inference.batch_size)
    p.add_argument(
        "--postprocessing",
        metavar="JSON",
        help="a postprocessing.json to apply instead of the plan's (e.g. a medseg evaluate "
        "run's), or 'none' to write the raw prediction",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="predict every case again (by default a case whose outputs were made by the same "
        "model and options is skipped; others are predicted again)",
    )
    p.add_argument(
        "--keep-going", action="store_true",
        help="a failing case does not stop the others; the failures are listed at the end "
        "(exit status 2)",
    )
    p.add_argument(
        "--max-voxels", type=int, metavar="N",
        help="refuse a case whose preprocessed (resampled) grid is larger, before allocating "
        "it (default 2**30: far above real scans, below a header's spacing in cm)",
    )
    p.add_argument("--tracking-uri", default=Config().tracking.tracking_uri)

    p = sub.add_parser("tune", help="Optuna search over tune.space, trials as nested MLflow runs")
    p.add_argument("--config", dest="config_file", help="a .json or .toml config file")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. tune.n_trials=20 tune.workers=2"
    )
    p.add_argument("--workers", type=int, help="processes sharing the study (tune.workers)")
    p.add_argument("--best-config", help="where the best trial's train config is written")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")

    p = sub.add_parser("reproduce", help="re-run a logged run from its config and compare")
    p.add_argument("run_id")
    p.add_argument("overrides", nargs="*", help="section.key=value changes, e.g. data.data_dir=")
    p.add_argument("--tracking-uri", default=Config().tracking.tracking_uri)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against mlruns/")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--tracking-uri", default=Config().tracking.tracking_uri)
    return parser


def _parse_value(text: str):
    import yaml  # papermill's own CLI reads parameter values as YAML

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _print_summary(summary: dict) -> None:
    print("validation Dice per case (original grid):")
    for key, stats in summary.items():
        print(
            f"  {key:28s} mean {stats['mean']:.4f}  median {stats['median']:.4f}  "
            f"n={stats['n']}"
        )


def cmd_build(args) -> None:
    from medseg import datasets

    # one line per case written, beside TFDS's own progress bars
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("medseg.datasets").setLevel(logging.INFO)
    builder = datasets.prepare(args.dataset, args.config, args.data_dir, args.manual_dir)
    fp = datasets.read_fingerprint(builder)
    print(f"built {builder.info.full_name} in {builder.data_dir}")
    # a split without cases (e.g. KiTS19's test cases not downloaded) is not built
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    print(f"  cases: {fp.num_cases}  fingerprint: {fp.hash}  splits: {splits}")


def cmd_info(args) -> None:
    """Summarise a built dataset's stored fingerprint (``--json``: print it raw).

    Reads ``metadata.json`` only, never the records.
    """
    from medseg import datasets

    builder = datasets.get_builder(args.dataset, args.config, args.data_dir)
    fp = datasets.read_fingerprint(builder)
    if getattr(args, "json", False):
        print(json.dumps(fp, indent=2))
        return
    print(f"{builder.info.full_name} ({builder.data_dir})")
    from medseg.datasets.fingerprint import format_fingerprint

    print(format_fingerprint(fp))


def cmd_plan(args) -> None:
    """Plan an experiment for a built dataset (building it if needed) and print it."""
    from medseg import datasets
    from medseg.planning import PlanOptions, explain, format_plan, parse_duration, plan_experiment

    builder = datasets.prepare(args.dataset, args.config, args.data_dir)
    fp = datasets.read_fingerprint(builder)
    options = PlanOptions(
        device=args.device,
        gpu_memory=args.gpu_memory,
        time_budget_s=parse_duration(args.time_budget),
        preset=args.preset,
    )
    plan = plan_experiment(
        fp, dataset=builder.info.full_name, fingerprint_hash=datasets.fingerprint_hash(fp),
        modalities=datasets.modalities(builder), options=options, probe=not args.no_probe,
    )
    # cached beside the dataset: a run with the same plan.* keys on this machine reuses it
    from medseg.planning.planner import cache_path

    plan.save(cache_path(builder.data_dir, plan.dataset, plan.fingerprint_hash, options, plan.device))
    if args.explain:
        print(explain(plan))
    else:
        print(format_plan(plan))
    if args.output:
        plan.save(args.output)
        print(f"wrote {args.output} (medseg train plan.mode={args.output})")


def cmd_train(args) -> None:
    config = Config.from_file(args.config_file) if args.config_file else Config()
    config = config.with_overrides(args.overrides)
    if args.print_config:
        print(config.to_json(redacted=True))  # secrets stay in this process
        return
    from medseg.tracking import run_training

    result, run_id = run_training(config)
    if result.data.experiment_plan is not None:
        from medseg.planning import format_plan

        print(format_plan(result.data.experiment_plan))
        for key, change in result.data.overrides.items():
            print(f"  {key}={change['used']} overrides the planned {change['planned']}")
    _print_summary(result.summary)
    if run_id is None:  # a multi-worker run's other workers: rank 0 logs
        print("this worker is not rank 0; the chief worker logs the MLflow run")
    else:
        import mlflow  # the store the run went to (MLFLOW_TRACKING_URI may have chosen it)

        print(f"MLflow run {run_id} in {redact(mlflow.get_tracking_uri())}; open it with: medseg ui")


def cmd_evaluate(args) -> None:
    config = Config.from_file(args.config_file) if args.config_file else Config()
    config = config.with_overrides(args.overrides)
    if args.print_config:
        print(config.to_json(redacted=True))  # secrets stay in this process
        return
    from medseg.tracking.evaluation import run_evaluation

    cv, run_id = run_evaluation(config, resume_run_id=args.resume)
    print(f"{config.evaluation.protocol}: {len(cv.folds)} fold(s), {len(cv.cases)} test cases")
    print("per case (original grid), pooled over folds:")
    for key, stats in cv.summary.items():
        print(
            f"  {key:32s} mean {stats['mean']:9.4f}  median {stats['median']:9.4f}  "
            f"std {stats['std']:9.4f}  n={stats['n']}"
        )
    if cv.postprocessing is not None:
        from medseg.inference.postprocess import describe_postprocessing

        print(f"postprocessing: {describe_postprocessing(cv.postprocessing)}")
    import mlflow

    print(f"MLflow run {run_id} (folds nested) in {redact(mlflow.get_tracking_uri())}")


def cmd_run(args) -> None:
    from mlflow.tracking import MlflowClient

    from medseg.config import TrackingConfig
    from medseg.tracking.notebook import run_notebook
    from medseg.tracking.store import resolve_tracking_uri

    params = {name: _parse_value(value) for name, value in args.parameter}
    tracking = TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)
    if not args.quiet:
        # papermill logs each cell's output at INFO on its own logger
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        papermill_log = logging.getLogger("papermill")
        papermill_log.addHandler(handler)
        papermill_log.setLevel(logging.INFO)
    output, run_id = run_notebook(
        args.notebook, params, tracking, args.output, log_output=not args.quiet
    )
    run = MlflowClient(resolve_tracking_uri(args.tracking_uri)).get_run(run_id)
    print(f"executed notebook: {output}")
    print(f"MLflow run {run_id} ({run.info.status})")
    for key in sorted(run.data.metrics):
        if key.startswith("val_case_"):
            print(f"  {key:40s} {run.data.metrics[key]:.4f}")


def cmd_predict(args) -> None:
    from medseg.config import InferenceConfig
    from medseg.inference import (
        Ensemble,
        PredictionPlan,
        SlidingWindow,
        is_model_uri,
        load_model_file,
        predict_files,
    )
    from medseg.inference.files import PredictionFailed, model_source
    from medseg.inference.postprocess import describe_postprocessing, load_postprocessing

    def load(model):
        if not is_model_uri(model):
            return load_model_file(model)
        from medseg.tracking.model import load_model  # imports mlflow

        return load_model(model, args.tracking_uri)

    def run_id_of(uri):  # the run that logged a models:/ URI, for the provenance record
        from medseg.tracking.model import source_run_id

        return source_run_id(uri, args.tracking_uri)

    ensemble = Ensemble.load(args.ensemble) if args.ensemble else None
    if ensemble is not None:
        args.model = [*args.model, *ensemble.models]
    if not args.model:
        raise ValueError("no model: give --model (repeatable) or --ensemble ensemble.json")
    if args.plan:
        plan = PredictionPlan.from_file(args.plan)
    elif is_model_uri(args.model[0]):
        from medseg.tracking.model import load_plan

        plan = load_plan(args.model[0], args.tracking_uri)
    else:
        raise ValueError(
            f"model {args.model[0]} does not say how it was trained: pass --plan plan.json "
            "(the plan.json artifact of its training run)"
        )
    if ensemble is not None and ensemble.postprocessing is not None:
        # decided on the pooled cross-validation cases, for this ensemble
        plan = dataclasses.replace(plan, postprocessing=ensemble.postprocessing)
    if args.postprocessing:
        decision = None
        if args.postprocessing.lower() != "none":
            decision = load_postprocessing(args.postprocessing)
        plan = dataclasses.replace(plan, postprocessing=decision)
    if plan.postprocessing:
        print(f"postprocessing: {describe_postprocessing(plan.postprocessing)}")
    # the inferer, configured once from the plan and these options (checked as config keys),
    # before any model is loaded: a refused option costs nothing
    inference = InferenceConfig(
        overlap=args.overlap,
        batch_size=args.batch_size,
        weighting=args.weighting,
        mirror_axes=(0, 1, 2) if args.mirror else (),
    )
    window = SlidingWindow.from_plan(plan, inference)
    models = [load(model) for model in args.model]
    try:
        written = predict_files(
            models,
            plan,
            args.inputs,
            args.output,
            window=window,
            probabilities=args.probabilities,
            overwrite=args.overwrite,
            keep_going=args.keep_going,
            sources=[model_source(model, run_id_of) for model in args.model],
            # the library's default bound unless given (importing it here would import TF)
            **({} if args.max_voxels is None else {"max_voxels": args.max_voxels}),
        )
    except PredictionFailed as err:
        print(f"wrote {len(err.written)} file(s) to {args.output}")
        raise  # main() prints the failed cases and exits with status 2
    print(f"wrote {len(written)} file(s) to {args.output}")


def cmd_tune(args) -> None:
    config = Config.from_file(args.config_file) if args.config_file else Config()
    config = config.with_overrides(args.overrides)
    if args.print_config:
        print(config.to_json(redacted=True))  # secrets stay in this process
        return
    from medseg.tuning import tune

    result = tune(config, workers=args.workers, best_config=args.best_config)
    print(f"study {result.study_name} in {redact(result.storage)}: {len(result.trials)} trials")
    for t in result.trials:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        print(f"  {t['number']:4d} {t['state']:9s} {value:>8s}  {t['params']}")
    if result.best_config is not None:
        print(f"best trial {result.best_trial}: {config.tune.metric} {result.best_value:.4f}")
        print(f"its config: {result.best_config} (medseg train --config {result.best_config})")
    print(f"MLflow study run {result.study_run_id} (trials nested)")


def cmd_reproduce(args) -> None:
    import warnings

    from medseg.tracking.reproduce import LineageWarning, reproduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)  # printed below, once
        result = reproduce(args.run_id, args.tracking_uri, args.overrides)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(result.table())
    print(f"MLflow run {result.run_id} reproduces {result.original_run_id}")


def ui_command(port: int, tracking_uri: str) -> list[str]:
    """The ``mlflow ui`` command line serving ``tracking_uri`` on 127.0.0.1."""
    from medseg.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    root = (Path("mlruns") / "artifacts").resolve()
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--default-artifact-root", root.as_uri(),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]


def cmd_ui(args) -> None:
    cmd = ui_command(args.port, args.tracking_uri)
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    os.execv(cmd[0], cmd)


COMMANDS = {
    "build": cmd_build,
    "info": cmd_info,
    "plan": cmd_plan,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "run": cmd_run,
    "predict": cmd_predict,
    "tune": cmd_tune,
    "reproduce": cmd_reproduce,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError, TrainingDiverged) as err:
        if os.environ.get("MEDSEG_DEBUG"):
            raise
        print(f"medseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
