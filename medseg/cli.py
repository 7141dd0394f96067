"""The ``medseg`` command line: build, info, train, run, ui."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medseg.config import Config, ConfigError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build a dataset (TFDS download_and_prepare)")
    p.add_argument("dataset", help="dataset name, e.g. kits_phantom")
    p.add_argument("--config", help="builder config, e.g. tiny or small")
    p.add_argument("--data-dir", help="TFDS data dir (default: TFDS's)")

    p = sub.add_parser("info", help="show a built dataset's fingerprint")
    p.add_argument("dataset")
    p.add_argument("--config")
    p.add_argument("--data-dir")

    p = sub.add_parser("train", help="train and evaluate one model, logged to MLflow")
    p.add_argument("--config", dest="config_file", help="a .json or .toml config file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")

    p = sub.add_parser("run", help="execute a notebook with papermill inside an MLflow run")
    p.add_argument("notebook")
    p.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    p.add_argument("--tracking-uri", default=Config().tracking.tracking_uri)
    p.add_argument("--experiment", default=Config().tracking.experiment)
    p.add_argument("--output", help="where the executed notebook is written")

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

    builder = datasets.prepare(args.dataset, args.config, args.data_dir)
    fp = datasets.read_fingerprint(builder)
    print(f"built {builder.info.full_name} in {builder.data_dir}")
    print(f"  cases: {fp['num_cases']}  fingerprint: {datasets.fingerprint_hash(fp)}")


def cmd_info(args) -> None:
    from medseg import datasets

    builder = datasets.get_builder(args.dataset, args.config, args.data_dir)
    fp = datasets.read_fingerprint(builder)
    print(f"{builder.info.full_name} ({builder.data_dir})")
    print(json.dumps(fp, indent=2))


def cmd_train(args) -> None:
    config = Config.from_file(args.config_file) if args.config_file else Config()
    config = config.with_overrides(args.overrides)
    if args.print_config:
        print(config.to_json())
        return
    from medseg.tracking import run_training

    result, run_id = run_training(config)
    _print_summary(result.summary)
    print(f"MLflow run {run_id} in {config.tracking.tracking_uri}; open it with: medseg ui")


def cmd_run(args) -> None:
    from mlflow.tracking import MlflowClient

    from medseg.config import TrackingConfig
    from medseg.tracking.notebook import run_notebook
    from medseg.tracking.store import resolve_tracking_uri

    params = {name: _parse_value(value) for name, value in args.parameter}
    tracking = TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)
    output, run_id = run_notebook(args.notebook, params, tracking, args.output)
    run = MlflowClient(resolve_tracking_uri(args.tracking_uri)).get_run(run_id)
    print(f"executed notebook: {output}")
    print(f"MLflow run {run_id} ({run.info.status})")
    for key in sorted(run.data.metrics):
        if key.startswith("val_case_"):
            print(f"  {key:40s} {run.data.metrics[key]:.4f}")


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
    "train": cmd_train,
    "run": cmd_run,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        if os.environ.get("MEDSEG_DEBUG"):
            raise
        print(f"medseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
