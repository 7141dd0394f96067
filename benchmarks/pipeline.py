"""Benchmark: the training input pipeline at KiTS19-like size, against the model it feeds.

On ``kits_phantom/bench`` (6 cases of 96-208 x 256 x 256 voxels, built on first use) with
MIScnn's KiTS19 settings (clip -79..304 HU, per-image z-score, resampling to
3.22 x 1.62 x 1.62 mm, patches of 80 x 160 x 160, batch 2, every augmentation with
probability 0.15), it prints:

* ``cold``: patches/s over the first epoch (``--cold-batches``, default the project's
  25 steps per epoch) of a fresh pipeline: reading, preprocessing, tracing included;
* ``warm``: patches/s over the next ``--warm-batches`` (preprocessed cases cached: only
  sampling and augmentation), and the same without augmentation (to see its share);
* peak RSS (``ru_maxrss``) after the pipeline phases, and again after the model phase;
* the default 3D U-Net's (``medseg.training.build_compiled_model``) time per training step
  at that patch size on a fixed batch, against the time the pipeline takes per batch,
  and steps of ``model.fit`` fed live by the pipeline (the two share the CPU there).

Usage::

    python benchmarks/pipeline.py                       # the full measurement
    python benchmarks/pipeline.py --warm-batches 10 --model-steps 0 --no-augment   # quick
    python benchmarks/pipeline.py --model-steps 0 --breakdown   # ms of each augmentation

Figures on a loaded machine are noisy: rerun on a quiet one before comparing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def miscnn_kits19_config(args):
    """medseg's Config with MIScnn's KiTS19 settings (its paper's example)."""
    from medseg.config import AugmentConfig, Config

    probabilities = {
        f.name: args.probability
        for f in dataclasses.fields(AugmentConfig)
        if f.name.endswith("_probability")
    }
    overrides = {
        "data.dataset": "kits_phantom",
        "data.config": args.config,
        "preprocess.target_spacing": [3.22, 1.62, 1.62],
        "preprocess.clip": [-79.0, 304.0],
        "preprocess.normalize": "image",
        "patch.patch_size": list(args.patch),
        "patch.batch_size": args.batch,
        "patch.foreground_share": args.foreground_share,
        "augment.enabled": not args.no_augment,
        **{f"augment.{k}": v for k, v in probabilities.items()},
    }
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    return Config().with_overrides(overrides)


def time_batches(iterator, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return time.perf_counter() - start


def _traced_augment(augment, config):
    import tensorflow as tf

    return tf.function(lambda image, label, seed: augment(image, label, config, seed))


def augmentation_breakdown(config, table, patch, repeats: int = 5) -> None:
    """ms per patch of each augmentation alone (probability 1), on one real patch."""
    import tensorflow as tf

    from medseg.pipeline.augment import augment

    image = table.images[0][: patch.patch_size[0], : patch.patch_size[1], : patch.patch_size[2]]
    label = tf.cast(table.labels[0][: image.shape[0], : image.shape[1], : image.shape[2]], tf.int32)
    names = [f.name for f in dataclasses.fields(config) if f.name.endswith("_probability")]
    off = {name: 0.0 for name in names}
    for name in ["none", *names]:
        alone = dataclasses.replace(config, enabled=True, **off)
        if name != "none":
            alone = dataclasses.replace(alone, **{name: 1.0})
        run = _traced_augment(augment, alone)
        run(image, label, seed=tf.constant([0, 0], tf.int64))  # trace and compile
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            out = run(image, label, seed=tf.constant([0, i + 1], tf.int64))
            out[0].numpy()
            times.append(time.perf_counter() - start)
        print(f"  augment {name:26s} {1000 * statistics.median(times):8.1f} ms per patch")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench", help="kits_phantom config (default bench)")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default TFDS's)")
    parser.add_argument("--cases", type=int, default=6, help="cases used (≤ the config's)")
    parser.add_argument("--patch", type=int, nargs=3, default=(80, 160, 160))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--probability", type=float, default=0.15, help="of each augmentation")
    parser.add_argument("--foreground-share", type=float, default=0.33)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument(
        "--cold-batches", type=int, default=None, help="default train.steps_per_epoch"
    )
    parser.add_argument("--warm-batches", type=int, default=40)
    parser.add_argument("--model-steps", type=int, default=3, help="0 skips the model phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each augmentation alone (p=1)"
    )
    args = parser.parse_args(argv)

    from medseg.pipeline import CaseTable, preprocessed_cases, training_dataset
    from medseg.workflows.experiment import prepare_data

    config = miscnn_kits19_config(args)
    config = config.with_overrides({"data.validation_fraction": 0.0, "seed": args.seed})
    cold_batches = args.cold_batches or config.train.steps_per_epoch
    start = time.perf_counter()
    setup = prepare_data(config)  # builds the dataset on first use: not part of "cold"
    ids = setup.train_ids[: args.cases]
    print(
        f"dataset {setup.dataset_name}: {len(ids)} cases (set-up {time.perf_counter() - start:.1f} s)"
    )
    num_classes = len(setup.class_names)
    patch = config.patch
    per_batch = patch.batch_size
    print(
        f"plan {setup.plan}; patch {tuple(patch.patch_size)} x {per_batch}; augmentation "
        f"{'off' if args.no_augment else f'on, p={args.probability} each'}; "
        f"{os.cpu_count()} CPUs"
    )

    # -- cold: a fresh pipeline's first epoch, preprocessing included ----------------------
    start = time.perf_counter()
    cases = preprocessed_cases(
        setup.builder, config.data.split, ids, setup.plan, num_classes, config.seed
    )
    table = CaseTable.from_dataset(cases)
    preprocess_s = time.perf_counter() - start
    train = training_dataset(
        table, len(ids), patch, num_classes, config.seed, augment=config.augment
    )
    traced_s = time.perf_counter() - start
    iterator = iter(train)
    next(iterator)
    first_s = time.perf_counter() - start
    time_batches(iterator, cold_batches - 1)
    cold_s = time.perf_counter() - start
    shapes = [tuple(int(s) for s in image.shape[:3]) for image in table.images]
    print(f"preprocessed shapes {shapes}")
    print(
        f"cold : {cold_batches * per_batch / cold_s:7.2f} patches/s  ({cold_batches} batches in "
        f"{cold_s:.1f} s: preprocessing {preprocess_s:.1f} s, traced at {traced_s:.1f} s, "
        f"first batch at {first_s:.1f} s)"
    )
    print(f"peak RSS after the cold epoch: {peak_rss_gb():.2f} GB")

    # -- warm: the cached cases, only sampling and augmentation --------------------------
    warm_s = time_batches(iterator, args.warm_batches)
    warm_rate = args.warm_batches * per_batch / warm_s
    print(f"warm : {warm_rate:7.2f} patches/s  ({args.warm_batches} batches in {warm_s:.1f} s)")
    if not args.no_augment:
        plain = training_dataset(table, len(ids), patch, num_classes, config.seed, augment=None)
        plain_iterator = iter(plain)
        time_batches(plain_iterator, 3)
        plain_s = time_batches(plain_iterator, args.warm_batches)
        print(
            f"warm without augmentation: {args.warm_batches * per_batch / plain_s:7.2f} patches/s"
        )
        del plain_iterator
    print(f"peak RSS after the pipeline phases: {peak_rss_gb():.2f} GB")
    if args.breakdown:
        augmentation_breakdown(config.augment, table, patch)

    if args.model_steps <= 0:
        return
    # -- the model it feeds ---------------------------------------------------------------
    from medseg.training import build_compiled_model, make_strategy

    images, labels = next(iterator)
    model = build_compiled_model(
        config.model,
        config.train,
        setup.class_names,
        int(images.shape[-1]),
        make_strategy("default"),
    )
    model.train_on_batch(images, labels)  # compile
    steps = []
    for _ in range(args.model_steps):
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps)
    batch_s = per_batch / warm_rate
    print(
        f"model: {config.model.name} depth {config.model.depth} filters "
        f"{config.model.filters}: {step_s:.2f} s per training step (median of {len(steps)}) "
        f"vs {batch_s:.2f} s per batch from the pipeline: "
        f"{'batches ready faster than consumed' if batch_s < step_s else 'PIPELINE IS SLOWER'}"
    )
    fed = train.take(args.model_steps + 1)
    model.fit(fed.take(1), epochs=1, verbose=0)  # fit traces its own step function first
    start = time.perf_counter()
    model.fit(fed.skip(1), epochs=1, verbose=0)
    fed_s = (time.perf_counter() - start) / args.model_steps
    print(f"model.fit fed live by the pipeline: {fed_s:.2f} s per step (both on the CPU)")
    print(f"peak RSS after the model phase: {peak_rss_gb():.2f} GB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
