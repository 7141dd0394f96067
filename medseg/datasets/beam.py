"""Building a medseg dataset with an Apache Beam pipeline (``medseg build --beam``).

TFDS's own Beam path (``BeamBasedBuilder``) would send every volume through TFDS's
generic serializer and shuffler. Here a pipeline runs the local build's steps on any
Beam runner: ``beam.Create`` over the case positions, a DoFn that loads, checks and
serialises each case with the functions of :mod:`medseg.datasets.builder` and
:mod:`medseg.datasets.records`, and a write of the shards in the local build's file
naming and layout (the same shard boundaries, examples in case order). The records are
byte-identical to a local build's, so TFDS reads them unchanged.

The fingerprint's streaming statistics are merged case by case in case order (Chan's
formula is not associative in floating point): the DoFn emits each case's partial
statistics (a few numbers and at most ``samples_per_case`` intensities), and this
process merges them in case order, so the fingerprint equals the local build's exactly.

A case that fails to load or check does not fail the pipeline (a runner would retry it,
and report it wrapped in its own error): its error travels back, and once the pipeline
has run, the first failing case's error is raised here, of the class and with the
message of a local build's (naming the case's files); TFDS then removes what was written.

The runner comes from Beam's own flags, e.g. ``--runner=DirectRunner
--direct_num_workers=2 --direct_running_mode=multi_processing``; Flink
(``--runner=FlinkRunner --flink_master=host:8081``), Spark (``--runner=SparkRunner``) or
Dataflow (``--runner=DataflowRunner --project=... --region=... --temp_location=gs://...``,
with a ``gs://`` data dir that the workers can write) take theirs. A distributed runner's
workers need medseg, its builders and the case files they read.
"""

from __future__ import annotations

import os
import pickle
import shlex
from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.config import ConfigError
from medseg.datasets import records
from medseg.datasets.builder import CaseBuilder, CaseExamples, _checked_case
from medseg.datasets.fingerprint import FingerprintAccumulator, _IntensityStats

try:
    import apache_beam as beam
except ImportError:  # an optional extra: require_beam() says how to install it
    beam = None

__all__ = ["generate_splits", "pipeline_options", "require_beam", "shard_lengths"]

INSTALL_HINT = "pip install 'medseg[beam]'"


def require_beam(where: str = "medseg build --beam"):
    """The ``apache_beam`` module, or a ConfigError saying how to install it.

    Parameters
    ----------
    where : str
        The option or argument that asked for Beam, named in the message.
    """
    if beam is None:
        try:  # installed since this module was imported (a notebook's pip install)
            import apache_beam
        except ImportError as err:
            raise ConfigError(
                f"{where}: Apache Beam is not installed in this environment ({err}); "
                f"install it with {INSTALL_HINT}, or build without --beam"
            ) from None
        return apache_beam
    return beam


def pipeline_options(flags: str | Sequence[str] | None, where: str = "--beam-options"):
    """Beam ``PipelineOptions`` from command-line flags, checked before any case is read.

    Parameters
    ----------
    flags : str or sequence of str or None
        E.g. ``"--runner=DirectRunner --direct_num_workers=2"`` (split as a shell would)
        or the list of flags; None or empty runs Beam's default (DirectRunner).
    where : str
        Named in error messages.

    Returns
    -------
    apache_beam.options.pipeline_options.PipelineOptions

    Raises
    ------
    ConfigError
        If Apache Beam is not installed, ``flags`` cannot be split or is not strings,
        or the runner is not one Beam knows.
    """
    require_beam(where)
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners import create_runner

    if flags is None:
        flags = []
    elif isinstance(flags, str):
        try:
            flags = shlex.split(flags)
        except ValueError as err:
            raise ConfigError(f"{where}={flags!r}: cannot be split into flags ({err})") from None
    elif isinstance(flags, list | tuple):
        flags = list(flags)
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        raise ConfigError(
            f"{where}: expected flags as strings (e.g. '--runner=DirectRunner'), got {flags!r}"
        )
    options = PipelineOptions(flags)
    runner = options.view_as(StandardOptions).runner
    if runner is not None:
        try:
            create_runner(runner)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"{where}: runner {runner!r} cannot be used: {err}") from None
    return options


def shard_lengths(sizes: Sequence[int], max_shard_bytes: int) -> list[int]:
    """Examples per shard for records of ``sizes`` bytes, in order: the rule of
    :func:`medseg.datasets.records.write_split` (a new shard once the current one would
    exceed ``max_shard_bytes``)."""
    lengths: list[int] = []
    shard_bytes = 0
    for size in sizes:
        if not lengths or (shard_bytes and shard_bytes + size > max_shard_bytes):
            lengths.append(0)
            shard_bytes = 0
        lengths[-1] += 1
        shard_bytes += size
    return lengths


def _case_partial(case, names: list[str], index: int) -> dict[str, Any]:
    """One labelled case's fingerprint statistics, as the ``index``-th case added.

    It goes through :meth:`FingerprintAccumulator.add` itself (same checks, same
    sampled voxels: case ``index`` draws with ``default_rng([0, index])``); what the
    accumulator holds after that one case is exactly the case's share.
    """
    acc = FingerprintAccumulator(names, seed=0)
    acc._shapes = [[]] * index  # noqa: SLF001 - makes this the index-th case
    acc.add(case.image, case.label, case.spacing)
    return {
        "voxel_counts": acc._voxel_counts,  # noqa: SLF001
        "spacing": acc._spacings[0],  # noqa: SLF001
        "shape": acc._shapes[-1],  # noqa: SLF001
        "layout": acc._layouts[0],  # noqa: SLF001
        "channels": [
            (s.count, s.total, s.m2, s.low, s.high, s.samples[0] if s.samples else None)
            for s in acc._channels  # noqa: SLF001
        ],
    }


def _merge_partial(acc: FingerprintAccumulator, partial: dict[str, Any]) -> None:
    """Add one case's :func:`_case_partial` to ``acc``, as ``acc.add`` would have."""
    counts = partial["voxel_counts"]
    channels = partial["channels"]
    if acc._channels is None:  # noqa: SLF001
        acc._channels = [_IntensityStats() for _ in channels]  # noqa: SLF001
    elif len(channels) != len(acc._channels):  # noqa: SLF001
        raise ValueError(
            f"image has {len(channels)} channel(s), earlier cases had {len(acc._channels)}"  # noqa: SLF001
        )
    acc._voxel_counts += counts  # noqa: SLF001
    acc._case_counts += counts > 0  # noqa: SLF001
    acc._spacings.append(partial["spacing"])  # noqa: SLF001
    acc._shapes.append(partial["shape"])  # noqa: SLF001
    acc._layouts.append(partial["layout"])  # noqa: SLF001
    for stats, (count, total, m2, low, high, sample) in zip(
        acc._channels, channels, strict=True  # noqa: SLF001
    ):
        if not count:
            continue
        # _IntensityStats.add's merge, with the case's own sum and m2
        if stats.count:
            delta = total / count - stats.total / stats.count
            stats.m2 += m2 + delta * delta * stats.count * count / (stats.count + count)
        else:
            stats.m2 = m2
        stats.count += count
        stats.total += total
        stats.low = min(stats.low, low)
        stats.high = max(stats.high, high)
        stats.samples.append(sample)


class _CaseDoFn(beam.DoFn if beam is not None else object):
    """Position -> ``(position, record bytes)``, and a small summary on ``"summary"``."""

    def __init__(self, loaders, features, names, image_dtype, fingerprint: bool):
        self.loaders = loaders
        self.features = features
        self.names = names
        self.image_dtype = image_dtype
        self.fingerprint = fingerprint
        self.serializer = None

    def setup(self):
        self.serializer = records.CaseSerializer(self.features)

    def process(self, position: int):
        try:
            yield from self._process(position)
        except Exception as err:  # noqa: BLE001 - reported by the driver, in case order
            yield beam.pvalue.TaggedOutput(
                "summary", {"position": position, "error": _portable(err)}
            )

    def _process(self, position: int):
        # contiguous: the volumes in C order, as the records store them (same bytes)
        case = _checked_case(
            self.loaders[position](), len(self.names), self.image_dtype, contiguous=True
        )
        example = {
            "image": case.image,
            "label": case.label,
            "spacing": case.spacing,
            "affine": case.affine,
            "case_id": case.case_id,
        }
        record = self.serializer.serialize(example)
        partial = None
        if self.fingerprint and case.labelled:
            partial = _case_partial(case, self.names, position)
        yield beam.pvalue.TaggedOutput(
            "summary",
            {
                "position": position,
                "case_id": case.case_id,
                "source": case.source,
                "labelled": case.labelled,
                "foreground": int(np.count_nonzero(case.label)),
                "size": len(record),
                "partial": partial,
            },
        )
        yield position, record


def _portable(err: Exception) -> bytes:
    """``err`` pickled, or a ValueError with its text when it would not travel back
    unchanged (as a build worker process does, :func:`medseg.datasets.builder._load_in_worker`)."""
    try:
        data = pickle.dumps(err)
        copy = pickle.loads(data)
        if str(copy) == str(err) and type(copy) is type(err):
            return data
    except Exception:  # noqa: BLE001 - any failure means it cannot travel
        pass
    return pickle.dumps(ValueError(f"{type(err).__name__}: {err}"))


def _write_shard(item, data_dir: str, split: str, template, num_shards: int) -> int:
    """Write one shard's records in case order (temporary name, then renamed)."""
    import tensorflow as tf

    shard, keyed = item
    path = f"{data_dir}/.{split}-beam{shard:05d}.tmp"
    with tf.io.TFRecordWriter(path) as writer:
        for _, record in sorted(keyed, key=lambda pair: pair[0]):
            writer.write(record)
    final = os.fspath(template.sharded_filepath(shard_index=shard, num_shards=num_shards))
    # a retried bundle writes the same bytes again
    tf.io.gfile.rename(path, final, overwrite=True)
    return shard


def _shard_of(item, lengths):
    """``(shard, (position, record))`` for a record at ``position`` in the split."""
    position = item[0]
    ends = np.cumsum(lengths)
    return int(np.searchsorted(ends, position, side="right")), item


def _save(summaries, path: str) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "wb") as handle:
        handle.write(pickle.dumps(summaries))


def _split_pipeline(pipeline, builder, split, loaders, cases, template, max_shard_bytes, path):
    """Add one split's transforms to ``pipeline``; its summaries go to ``path``."""
    names = list(builder.class_names())
    data_dir = os.fspath(template.data_dir)
    label = f"{split}:"
    outputs = (
        pipeline
        | f"{label} cases" >> beam.Create(range(len(loaders)))
        # spread the cases over the workers (Create alone may fuse them onto one)
        | f"{label} spread" >> beam.Reshuffle()
        | f"{label} read" >> beam.ParDo(
            _CaseDoFn(loaders, builder.info.features, names, cases.image_dtype, cases.fingerprint)
        ).with_outputs("summary", main="records")
    )
    summaries = outputs.summary | f"{label} summaries" >> beam.combiners.ToList()
    lengths = summaries | f"{label} layout" >> beam.Map(
        lambda items: shard_lengths(
            [s.get("size", 0) for s in sorted(items, key=lambda s: s["position"])],
            max_shard_bytes,
        )
    )
    _ = (
        outputs.records
        | f"{label} shard" >> beam.Map(_shard_of, beam.pvalue.AsSingleton(lengths))
        | f"{label} group" >> beam.GroupByKey()
        | f"{label} write" >> beam.Map(
            lambda item, lengths: _write_shard(item, data_dir, split, template, len(lengths)),
            beam.pvalue.AsSingleton(lengths),
        )
    )
    _ = summaries | f"{label} save" >> beam.Map(_save, path)


def generate_splits(builder, generators: dict, download_config) -> list:
    """Build ``generators``' splits with one Beam pipeline; their ``SplitInfo``s.

    Called by :meth:`medseg.datasets.builder.CaseBuilder._generate_splits` when the
    download config has Beam options (``medseg.datasets.prepare(beam_options=...)``).
    Stores the fingerprint in ``builder.info.metadata`` as a local build does.

    Raises
    ------
    ConfigError
        If Apache Beam is not installed.
    ValueError
        If a split is not generated through ``CaseBuilder._generate_cases``, the file
        format is not TFRecord, or two cases share a case id (as the local build).
    Exception
        The first failing case's own error (e.g. a ``MedsegIOError`` naming its file), as
        a local build raises it.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    require_beam()
    where = builder.info.full_name
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        raise ValueError(
            f"{where}: a Beam build writes TFRecord shards, not {builder.info.file_format}; "
            "build without --beam"
        )
    max_shard_bytes = records.MAX_SHARD_BYTES
    plan = []
    for split, cases in generators.items():
        loaders = getattr(cases, "loaders", None) if isinstance(cases, CaseExamples) else None
        if loaders is None:
            raise ValueError(
                f"{where}: split {split!r} is not generated through "
                "CaseBuilder._generate_cases, so a Beam pipeline cannot read its cases; "
                "build without --beam"
            )
        if download_config.max_examples_per_split is not None:
            loaders = loaders[: download_config.max_examples_per_split]
        template = builder._get_filename_template(split_name=split)  # noqa: SLF001
        path = f"{os.fspath(template.data_dir)}/.{split}-beam-summaries.pkl"
        plan.append((split, cases, loaders, template, path))

    pipeline = beam.Pipeline(
        runner=download_config.beam_runner, options=download_config.beam_options
    )
    with pipeline:
        for split, cases, loaders, template, path in plan:
            _split_pipeline(
                pipeline, builder, split, loaders, cases, template, max_shard_bytes, path
            )

    infos = []
    seen: dict[str, int] = {}
    for split, cases, loaders, template, path in plan:
        with tf.io.gfile.GFile(path, "rb") as handle:
            summaries = sorted(pickle.loads(handle.read()), key=lambda s: s["position"])
        tf.io.gfile.remove(path)
        for summary in summaries:
            if "error" in summary:
                # the local build's error for the first failing case, of the same class
                raise pickle.loads(summary["error"])
            _check_unique(summary, seen, where, split)
        if cases.fingerprint:
            acc = FingerprintAccumulator(list(builder.class_names()), seed=0)
            for summary in (s for s in summaries if s["labelled"]):
                partial = summary["partial"]
                if acc.num_cases != summary["position"] and (
                    summary["foreground"] > acc.samples_per_case
                ):
                    # unlabelled cases came before it: its sample is drawn for the index
                    # it has among labelled cases (rare: reload it here)
                    case = _checked_case(
                        loaders[summary["position"]](),
                        len(acc.class_names),
                        cases.image_dtype,
                    )
                    partial = _case_partial(case, acc.class_names, acc.num_cases)
                _merge_partial(acc, partial)
            builder._fingerprint_acc = acc  # noqa: SLF001 - stored again after the build
            builder._store_fingerprint(acc)  # noqa: SLF001
        sizes = [s["size"] for s in summaries]
        infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=shard_lengths(sizes, max_shard_bytes),
                num_bytes=int(sum(sizes)),
                filename_template=template,
            )
        )
    return infos


def _check_unique(summary: dict, seen: dict[tuple, int], where: str, split: str) -> None:
    """The local build's check that a case id does not repeat within a split."""
    key = (split, summary["case_id"])
    index = summary["position"]
    if key in seen:
        raise ValueError(
            f"{where}: case id {summary['case_id']!r} of case {index + 1} "
            f"({summary['source']}) repeats case {seen[key] + 1}"
        )
    seen[key] = index


# the local builder hands its splits to this module when Beam options are given
CaseBuilder.beam_split_writer = staticmethod(generate_splits)
