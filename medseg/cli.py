"""The ``medseg`` command line: build, info, plan, train, evaluate, compare, predict, score,
export, tune, run, reproduce, ui."""

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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose paragraphs; keeps indented lines (the examples) as written."""

    def _fill_text(self, text, width, indent):
        import textwrap

        paragraphs = []
        for block in textwrap.dedent(text).strip("\n").split("\n\n"):
            lines = block.splitlines()
            if all(line.startswith(" ") for line in lines[1:]) and (
                lines[0].startswith(" ") or lines[0].rstrip().endswith(":")
            ):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(
                    textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                  subsequent_indent=indent)
                )
        return "\n\n".join(paragraphs)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's help with :class:`_Formatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


_CONFIG_FILE_HELP = (
    "a .json, .toml, .yaml or .yml config file, or a shipped recipe's name "
    "(kits19, msd_task04; see medseg train --list-configs)"
)


def _parser() -> argparse.ArgumentParser:
    from medseg import __version__

    parser = _Parser(
        prog="medseg", description=__doc__,
        epilog="""examples:
  medseg build kits_phantom --config small
  medseg train --config kits19 train.epochs=5
  medseg predict cases/ --model model.zip --output predicted/

Run medseg <command> --help for a command's options and an example.""",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}",
        help="print medseg's version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "build",
        help="build a dataset (TFDS download_and_prepare)",
        description="Build a dataset's TFRecords and fingerprint.",
        epilog="""examples:
  medseg build kits_phantom --config small
  medseg build kits19 --manual-dir /data/kits19/data
  medseg build nifti_folder --config my_data.json --workers 2
  medseg build nifti_folder --config my_data.json --beam \\
      --beam-options '--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing'

--beam (pip install 'medseg[beam]') writes the records and fingerprint of a local build
through an Apache Beam pipeline, on any runner its flags name (Flink, Spark, Dataflow:
their --runner and options; see medseg.datasets.beam).""",
    )
    p.add_argument("dataset", help="dataset name, e.g. kits_phantom")
    p.add_argument("--config", help="builder config (e.g. tiny, small) or a .json config file")
    p.add_argument("--data-dir", help="TFDS data dir (default: TFDS's)")
    p.add_argument("--manual-dir", help="where a manually downloaded dataset lies (kits19, msd)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes reading cases (default: one per core; 1 reads in this process); "
        "the records do not depend on it",
    )
    p.add_argument(
        "--beam",
        action="store_true",
        help="build with an Apache Beam pipeline (pip install 'medseg[beam]'); the records "
        "and fingerprint are those of a local build; --workers is not used",
    )
    p.add_argument(
        "--beam-options",
        metavar="FLAGS",
        help="Beam pipeline flags in one string, with --beam, e.g. '--runner=DirectRunner "
        "--direct_num_workers=2 --direct_running_mode=multi_processing' "
        "(default: Beam's DirectRunner); a single flag needs the = form: "
        "--beam-options=--runner=DirectRunner",
    )

    p = sub.add_parser(
        "info", help="summarise a built dataset's fingerprint",
        description="Print a built dataset's fingerprint (spacings, shapes, intensities, "
        "classes) from its metadata; the records are not read.",
        epilog="""examples:
  medseg info kits_phantom --config small
  medseg info kits_phantom --config small --json""",
    )
    p.add_argument("dataset", help="dataset name, e.g. kits_phantom")
    p.add_argument("--config", help="builder config, e.g. small")
    p.add_argument("--data-dir", help="TFDS data dir (default: TFDS's)")
    p.add_argument("--json", action="store_true", help="print the raw fingerprint as JSON")

    p = sub.add_parser(
        "plan",
        help="fit spacing, patch, network, batch and training length to a dataset and this machine",
        description="Plan an experiment from the dataset's fingerprint and this machine "
        "(nnU-Net's rules; on a CPU, or with --time-budget, the planned network is timed "
        "here and the step count fitted to the budget).",
        epilog="""examples:
  medseg plan kits_phantom --config small --time-budget 8m --explain
  medseg plan kits19 --device gpu --gpu-memory 24 --preset resenc_l --output plan.json""",
    )
    p.add_argument("dataset", help="dataset name, e.g. kits_phantom")
    p.add_argument("--config", help="builder config (e.g. small) or a .json config file")
    p.add_argument("--data-dir", help="TFDS data dir (default: TFDS's)")
    p.add_argument(
        "--device", choices=("auto", "cpu", "gpu"), default="auto",
        help="the device to plan for (default: auto, a GPU if one is visible)",
    )
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

    p = sub.add_parser(
        "train", help="train and evaluate one model, logged to MLflow",
        description="Train one model on data.split less a validation share, score the "
        "validation cases on their original grid and log params, metrics, plan, model and "
        "overlays to one MLflow run.",
        epilog="""examples:
  medseg train train.epochs=5
  medseg train --config kits19 train.epochs=50 model.filters=32
  medseg train --config my.yaml --print-config
  medseg train --list-configs""",
    )
    p.add_argument("--config", dest="config_file", help=_CONFIG_FILE_HELP)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument(
        "--list-configs", action="store_true", help="list the shipped recipes and exit"
    )

    p = sub.add_parser(
        "evaluate", help="cross-validate (or hold out) by evaluation.protocol, fold runs nested",
        description="Train and score one model per fold of evaluation.protocol (split, kfold, "
        "loo, holdout, lists) on one plan; per-case scores pooled over folds, a "
        "postprocessing decision and ensemble.json in the parent MLflow run.",
        epilog="""examples:
  medseg evaluate evaluation.protocol=kfold evaluation.folds=5
  medseg evaluate --config kits19
  medseg evaluate --resume 0123456789abcdef0123456789abcdef""",
    )
    p.add_argument("--config", dest="config_file", help=_CONFIG_FILE_HELP)
    p.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. evaluation.protocol=kfold"
    )
    p.add_argument(
        "--resume", metavar="RUN_ID", help="continue an interrupted evaluation's parent run"
    )
    p.add_argument("--print-config", action="store_true", help="print the config and exit")

    p = sub.add_parser(
        "compare",
        help="cross-validate variants of one config key on the same folds and test them",
        description="Each value of one config key is a cross-validation on the same plan, "
        "folds and seeds, nested under one study run; the study logs per-structure Dice and "
        "HD95, paired Wilcoxon tests against the baseline (Holm-corrected), box plots and "
        "mean ranks.",
        epilog="""example:
  medseg compare model.name=unet,residual_unet evaluation.protocol=kfold \\
      evaluation.folds=5 --baseline unet""",
    )
    p.add_argument(
        "variants", help="the compared key and its values, e.g. model.name=unet,residual_unet"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value for every variant")
    p.add_argument("--config", dest="config_file", help=_CONFIG_FILE_HELP)
    p.add_argument("--baseline", help="the value the others are tested against (default: first)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted study run")

    p = sub.add_parser(
        "run", help="execute a notebook with papermill inside an MLflow run",
        description="Execute a notebook with papermill, its parameters cell overridden, "
        "inside one MLflow run that gets the parameters and the executed notebook.",
        epilog="""example:
  medseg run notebooks/train.ipynb -p epochs 2 -p dataset kits_phantom""",
    )
    p.add_argument("notebook", help="the .ipynb to execute, e.g. notebooks/train.ipynb")
    p.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="set a parameters-cell variable (value read as YAML: 2, 0.1, true, [1, 2]); "
        "repeatable",
    )
    p.add_argument(
        "--tracking-uri", default=Config().tracking.tracking_uri,
        help="MLflow tracking URI (default: %(default)s)",
    )
    p.add_argument(
        "--experiment", default=Config().tracking.experiment,
        help="MLflow experiment (default: %(default)s)",
    )
    p.add_argument("--output", help="where the executed notebook is written")
    p.add_argument("--quiet", action="store_true", help="do not stream the cells' output")

    p = sub.add_parser(
        "predict", help="segment NIfTI files or DICOM series with a model",
        description="Sliding-window prediction of whole cases on their original grid, "
        "with the training run's preprocessing and postprocessing.",
        epilog="""examples:
  medseg predict cases/ --model model.zip --output predicted/
  medseg predict cases/ --model fold0.keras --model fold1.keras \\
      --plan plan.json --output predicted/ --uncertainty ensemble
  medseg predict case.nii.gz --model runs:/<run id>/model --output predicted/""",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="a .nii/.nii.gz file, a folder of them, or a DICOM series folder",
    )
    p.add_argument(
        "--model", action="append", default=[],
        help="a .keras file, a model.zip from medseg export (its plan and postprocessing "
        "come along), or an MLflow model URI (runs:/<run id>/model, models:/...); "
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
    p.add_argument(
        "--overlap", type=float, default=Config().inference.overlap,
        help="share of a window overlapping its neighbour, in [0, 0.95) (default: %(default)s)",
    )
    p.add_argument(
        "--weighting", choices=("gaussian", "mean"), default=Config().inference.weighting,
        help="how overlapping windows are merged (default: %(default)s)",
    )
    p.add_argument("--mirror", action="store_true", help="test-time mirroring along all axes")
    p.add_argument(
        "--batch-size", type=int, default=Config().inference.batch_size,
        help="windows per forward pass (default: %(default)s)",
    )
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
    p.add_argument(
        "--uncertainty", choices=("none", "tta", "ensemble", "mc-dropout"),
        default=Config().inference.uncertainty,
        help="also write <case>_entropy.nii.gz and <case>_mutual_info.nii.gz (nats), "
        "<case>_uncertainty.json and .gif from several samples: tta the --mirror flips, "
        "ensemble the models, mc-dropout passes with the model's Dropout layers on",
    )
    p.add_argument(
        "--uncertainty-samples", type=int, metavar="N",
        default=Config().inference.uncertainty_samples,
        help="mc-dropout passes per case (at least 2)",
    )
    p.add_argument(
        "--seed", type=int, default=Config().inference.uncertainty_seed,
        help="fixes the mc-dropout masks (default: random)",
    )
    p.add_argument(
        "--tracking-uri", default=Config().tracking.tracking_uri,
        help="MLflow tracking URI of runs:/ and models:/ models (default: %(default)s)",
    )

    p = sub.add_parser(
        "tune",
        help="Optuna search over tune.space, trials as nested MLflow runs",
        description="Run (or resume) the Optuna study of tune.*; the study's MLflow run gets "
        "the trial table, the best config and plots/*.png.",
        epilog="""examples:
  medseg tune tune.n_trials=20 tune.sampler=random \\
      tune.pruner=percentile tune.pruner_percentile=25 --quiet
  medseg tune --config kits19 tune.n_trials=40 --workers 2 --best-config best.json""",
    )
    p.add_argument("--config", dest="config_file", help=_CONFIG_FILE_HELP)
    p.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. tune.n_trials=20 tune.workers=2"
    )
    p.add_argument("--workers", type=int, help="processes sharing the study (tune.workers)")
    p.add_argument("--best-config", help="where the best trial's train config is written")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument(
        "--quiet", action="store_true",
        help="no Optuna per-trial lines nor progress bar (shown by default, the bar on a terminal)",
    )

    p = sub.add_parser(
        "reproduce", help="re-run a logged run from its config and compare",
        description="Re-run a logged training run from its logged config and plan, and "
        "print its metrics beside the original's.",
        epilog="""example:
  medseg reproduce 0123456789abcdef0123456789abcdef data.data_dir=/data/tfds""",
    )
    p.add_argument("run_id", help="the MLflow run id to re-run")
    p.add_argument("overrides", nargs="*", help="section.key=value changes, e.g. data.data_dir=")
    p.add_argument(
        "--tracking-uri", default=Config().tracking.tracking_uri,
        help="MLflow tracking URI the run is in (default: %(default)s)",
    )

    p = sub.add_parser(
        "score",
        help="score a folder of predictions against references (nnU-Net's summary.json)",
        description="Dice, IoU, TP/FP/FN/TN per case and label (and per nnU-Net region) "
        "into summary.json (nnU-Net's layout) and scores.tsv.",
        epilog="""example:
  medseg score predictions/ Dataset001_Kidney/labelsTr \\
      --labels Dataset001_Kidney/dataset.json --output scores/ --hd95""",
    )
    p.add_argument("pred_dir", help="predicted label maps: <case>.nii.gz or <case>_seg.nii.gz")
    p.add_argument("gt_dir", help="reference label maps <case>.nii.gz, e.g. labelsTr")
    p.add_argument(
        "--labels", help="nnU-Net dataset.json: labels and regions to score "
        "(default: every foreground value of the references)"
    )
    p.add_argument("--output", help="folder for summary.json and scores.tsv (default: PRED_DIR)")
    p.add_argument("--hd95", action="store_true", help="also HD95 in mm (slower)")

    p = sub.add_parser(
        "export",
        help="write a run's model, plan and postprocessing into one self-contained zip",
        description="Export a training run's model (or an evaluate run's fold ensemble) with "
        "its plan.json and postprocessing.json into one zip with a manifest of SHA-256s; "
        "medseg predict --model model.zip needs no tracking store.",
        epilog="""example:
  medseg export 0123456789abcdef0123456789abcdef --output model.zip""",
    )
    p.add_argument("run_id", help="the MLflow run id of a medseg train or evaluate run")
    p.add_argument("--output", required=True, help="the zip to write, e.g. model.zip")
    p.add_argument(
        "--tracking-uri", default=Config().tracking.tracking_uri,
        help="MLflow tracking URI the run is in",
    )

    p = sub.add_parser(
        "ui", help="start the MLflow UI on 127.0.0.1 against mlruns/ (or print a server's URL)",
        description="Serve the MLflow UI for the tracking store (sqlite, PostgreSQL, ...) on "
        "this machine only (127.0.0.1). When the store is an MLflow server (http(s)://, from "
        "--tracking-uri or MLFLOW_TRACKING_URI), it already serves the UI: its URL is printed "
        "(password hidden) and nothing is started.",
        epilog="""examples:
  medseg ui --port 5001
  medseg ui --tracking-uri postgresql://ann@db.example.org/mlflow
  MLFLOW_TRACKING_URI=http://mlflow.example.org:5000 medseg ui""",
    )
    p.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    p.add_argument(
        "--tracking-uri", default=Config().tracking.tracking_uri,
        help="MLflow tracking URI to serve (default: %(default)s)",
    )
    # progress bars (medseg.progress): on a terminal, else sparse plain lines; --quiet
    # (before or after the command) or MEDSEG_QUIET=1 silences them, never the summary
    quiet_help = "no progress bars nor per-case progress lines (errors and the summary still print)"
    parser.add_argument("--quiet", dest="quiet_all", action="store_true", help=quiet_help)
    for name in ("build", "train", "evaluate", "compare", "predict", "reproduce"):
        sub.choices[name].add_argument("--quiet", action="store_true", help=quiet_help)
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
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    if args.beam_options is not None and not args.beam:
        raise ConfigError("--beam-options needs --beam (a Beam build); add --beam or drop it")
    beam_options = (args.beam_options or "") if args.beam else None
    builder = datasets.prepare(
        args.dataset, args.config, args.data_dir, args.manual_dir, workers=workers,
        beam_options=beam_options,
    )
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
    if args.list_configs:
        from medseg.configs import describe_recipes

        print(describe_recipes())
        return
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


def cmd_compare(args) -> None:
    from medseg.workflows.compare import parse_variants

    config = Config.from_file(args.config_file) if args.config_file else Config()
    config = config.with_overrides(args.overrides)
    parse_variants(config, args.variants, args.baseline)  # a bad list fails before any store
    from medseg.tracking.compare import run_comparison

    comparison, run_id = run_comparison(config, args.variants, args.baseline, args.resume)
    print(comparison.markdown())
    print(f"MLflow study run {run_id} (variants and their folds nested)")


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
    # model zips (medseg export): checked and unpacked here, removed once loaded; their
    # plan and postprocessing unless --plan/--postprocessing
    import tempfile

    from medseg.inference.bundle import unpack_models

    unpacked = tempfile.TemporaryDirectory(prefix="medseg-predict-")
    args.model, origins, bundle_plan = unpack_models(args.model, unpacked.name)
    if args.plan:
        plan = PredictionPlan.from_file(args.plan)
    elif bundle_plan is not None:
        plan = bundle_plan
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
        uncertainty=args.uncertainty,
        uncertainty_samples=args.uncertainty_samples,
        uncertainty_seed=args.seed,
    )
    window = SlidingWindow.from_plan(plan, inference)
    models = [load(model) for model in args.model]
    unpacked.cleanup()
    temperature = None
    if args.probabilities and len(args.model) == 1 and is_model_uri(args.model[0]):
        from medseg.tracking.model import load_temperature

        # the run's validation fit (evaluation.calibration): calibrated probabilities
        temperature = load_temperature(args.model[0], args.tracking_uri)
        if temperature is not None:
            print(f"probabilities calibrated with temperature {temperature:.4g} "
                  "(temperature.json of the model's run)")
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
            uncertainty=inference.uncertainty,
            uncertainty_samples=inference.uncertainty_samples,
            seed=inference.uncertainty_seed,
            temperature=temperature,
            sources=[model_source(model, run_id_of) for model in origins],
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

    result = tune(config, workers=args.workers, best_config=args.best_config, quiet=args.quiet)
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


def cmd_export(args) -> None:
    from medseg.tracking.model import export_run  # the logic lives there

    path = export_run(args.run_id, args.output, args.tracking_uri)
    print(f"wrote {path} (medseg predict --model {path} ...)")


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
    from medseg.tracking.store import is_remote, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if is_remote(uri):  # a team's server serves its own UI; a local one could not read it
        print(f"the tracking store is the MLflow server {redact(uri)}: open that URL in a "
              "browser (no local UI started)", flush=True)
        return
    cmd = ui_command(args.port, args.tracking_uri)
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    os.execv(cmd[0], cmd)


def cmd_score(args) -> None:
    from medseg.evaluation.scoring import score_command  # TF-free

    score_command(args)


COMMANDS = {
    "build": cmd_build,
    "info": cmd_info,
    "plan": cmd_plan,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "compare": cmd_compare,
    "run": cmd_run,
    "predict": cmd_predict,
    "tune": cmd_tune,
    "reproduce": cmd_reproduce,
    "ui": cmd_ui,
    "export": cmd_export,
    "score": cmd_score,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from medseg.progress import set_quiet  # TF-free

    # per call, so that one quiet call does not silence the next (tests call main repeatedly)
    args.quiet = args.quiet_all or getattr(args, "quiet", False)
    set_quiet(args.quiet)
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
