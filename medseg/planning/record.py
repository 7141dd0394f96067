"""The experiment plan: one typed, versioned record of everything planning decided.

An :class:`ExperimentPlan` is written by ``medseg plan`` (and by every run with
``plan.mode=auto``), logged with the run, and read back by ``medseg reproduce``, which
trains from the recorded plan instead of planning again. Its reader and writer live here
together; a malformed file is refused naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.io.jsonfile import read_json, write_json
from medseg.planning.rules import Topology

__all__ = ["PLAN_VERSION", "Decision", "ExperimentPlan", "PlanError"]

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan that cannot be made (budget, memory, data) or a plan file that cannot be read."""


@dataclass(frozen=True)
class Decision:
    """Why one planned value is what it is: the rule and the numbers it used."""

    key: str
    value: Any
    rule: str
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentPlan:
    """Spacing, normalisation, patch, network, batch and training length of one dataset
    on one machine (and budget).

    The config keys it sets are listed by :meth:`config_values`; the network's per-stage
    ``strides`` and ``kernels`` and its ``widths`` have no config key and are read by the
    model builder from the plan itself.
    """

    dataset: str
    fingerprint_hash: str
    device: str  # "cpu" | "gpu"
    preset: str  # "default" | "resenc_m" | "resenc_l"
    modalities: tuple[str, ...]
    target_spacing: tuple[float, ...]
    median_shape: tuple[float, ...]  # after resampling
    normalize: str  # preprocess.normalize
    clip: str  # preprocess.clip
    crop_to_nonzero: bool
    model: str  # model.name
    patch_size: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    widths: tuple[int, ...]
    deep_supervision: bool
    batch_size: int
    foreground_share: float
    epochs: int
    steps_per_epoch: int
    memory_bytes: float  # the memory model's training estimate
    memory_budget_bytes: float
    feature_map_elements: float  # nnU-Net's figure, one sample
    parameters: int
    flops_per_step: float  # convolution FLOPs of one training step
    time_budget_s: float | None = None
    predicted_train_s: float | None = None
    # the CPU probe: seconds_per_step, conv_gflops, efficiency, probes
    probe: dict[str, Any] | None = None
    # augment.bias_field_probability (0 in plans made before the rule: they run as before)
    bias_field_probability: float = 0.0
    # augment.bias_field_pedestal and augment.flip_axes (None in plans made before the
    # rule: the config's axes)
    bias_field_pedestal: tuple[float, ...] = (0.0, 0.0)
    flip_axes: tuple[int, ...] | None = None
    decisions: tuple[Decision, ...] = ()
    version: int = PLAN_VERSION

    # -- derived ---------------------------------------------------------------------------
    @property
    def topology(self) -> Topology:
        return Topology(self.strides, self.kernels)

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def config_values(self) -> dict[str, Any]:
        """The config keys this plan sets, with their planned values."""
        return {
            "preprocess.target_spacing": list(self.target_spacing),
            "preprocess.normalize": self.normalize,
            "preprocess.clip": self.clip,
            "preprocess.crop_to_nonzero": self.crop_to_nonzero,
            "patch.patch_size": list(self.patch_size),
            "patch.batch_size": self.batch_size,
            "patch.foreground_share": self.foreground_share,
            "augment.bias_field_probability": self.bias_field_probability,
            "augment.bias_field_pedestal": list(self.bias_field_pedestal),
            **({} if self.flip_axes is None else {"augment.flip_axes": list(self.flip_axes)}),
            "model.name": self.model,
            "model.depth": self.num_stages,
            "model.filters": self.widths[0],
            "model.deep_supervision": self.deep_supervision,
            "train.epochs": self.epochs,
            "train.steps_per_epoch": self.steps_per_epoch,
        }

    def with_values(self, **changes) -> ExperimentPlan:
        return dataclasses.replace(self, **changes)

    # -- reading and writing ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["decisions"] = [dataclasses.asdict(d) for d in self.decisions]
        return json.loads(json.dumps(values))

    @classmethod
    def from_dict(cls, values: Any, where: str = "plan") -> ExperimentPlan:
        """Read a plan; ``where`` (e.g. the file) names it in errors.

        Raises
        ------
        PlanError
            Naming ``where`` and the field that is missing, of the wrong type or invalid.
        """
        if not isinstance(values, dict):
            raise PlanError(f"{where}: expected a JSON object, got {type(values).__name__}")
        version = values.get("version")
        if version != PLAN_VERSION:
            raise PlanError(
                f"{where}: field 'version' is {version!r}; this medseg reads plan version "
                f"{PLAN_VERSION} (plan again with medseg plan)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
        parsed = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise PlanError(f"{where}: field {f.name!r} is missing")
                continue
            parsed[f.name] = _FIELDS[f.name](values[f.name], f"{where}: field {f.name!r}")
        plan = cls(**parsed)
        plan.check(where)
        return plan

    def check(self, where: str = "plan") -> None:
        """Raise :class:`PlanError` naming the field where the plan contradicts itself."""
        ndim = len(self.target_spacing)
        for name in ("patch_size", "median_shape"):
            if len(getattr(self, name)) != ndim:
                raise PlanError(
                    f"{where}: field {name!r} has {len(getattr(self, name))} axes, "
                    f"'target_spacing' {ndim}"
                )
        if len(self.strides) != len(self.kernels) or len(self.strides) != len(self.widths):
            raise PlanError(
                f"{where}: fields 'strides', 'kernels' and 'widths' must have one entry per "
                f"stage, got {len(self.strides)}, {len(self.kernels)}, {len(self.widths)}"
            )
        for name in ("strides", "kernels"):
            if any(len(s) != ndim for s in getattr(self, name)):
                raise PlanError(f"{where}: field {name!r}: every stage needs {ndim} values")
        if any(s != 1 for s in self.strides[0]):
            raise PlanError(f"{where}: field 'strides': stage 0 must not pool, got {self.strides[0]}")
        divisor = self.topology.divisor
        if any(p % d for p, d in zip(self.patch_size, divisor, strict=True)):
            raise PlanError(
                f"{where}: field 'patch_size' {list(self.patch_size)} is not a multiple of the "
                f"network's total stride {list(divisor)} per axis"
            )
        if self.device not in ("cpu", "gpu"):
            raise PlanError(f"{where}: field 'device' must be 'cpu' or 'gpu', got {self.device!r}")
        for name in ("foreground_share", "bias_field_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PlanError(f"{where}: field {name!r} must be in [0, 1]")
        low_high = self.bias_field_pedestal
        if len(low_high) != 2 or not 0.0 <= low_high[0] <= low_high[1]:
            raise PlanError(
                f"{where}: field 'bias_field_pedestal' must be [low, high] with 0 ≤ low ≤ high, "
                f"got {list(low_high)}"
            )
        if self.flip_axes is not None and any(a >= ndim for a in self.flip_axes):
            raise PlanError(
                f"{where}: field 'flip_axes' {list(self.flip_axes)} names an axis the "
                f"{ndim}-d plan does not have"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically (a temporary file, then a rename)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExperimentPlan:
        values = read_json(path, "plan file", error=PlanError)
        return cls.from_dict(values, where=f"plan file {path}")


# -- field readers: (value, where) -> parsed value ------------------------------------------


def _fail(where: str, expected: str, value: Any):
    raise PlanError(f"{where} must be {expected}, got {value!r}")


def _str(value, where):
    return value if isinstance(value, str) else _fail(where, "a string", value)


def _bool(value, where):
    return value if isinstance(value, bool) else _fail(where, "true or false", value)


def _int(minimum):
    def read(value, where):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(where, f"an integer ≥ {minimum}", value)
        return value

    return read


def _number(positive: bool):
    def read(value, where):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            _fail(where, "a number", value)
        if positive and value <= 0:
            _fail(where, "a positive number", value)
        return float(value)

    return read


def _optional(read):
    return lambda value, where: None if value is None else read(value, where)


def _tuple(read, nested: bool = False):
    def parse(value, where):
        if not isinstance(value, list | tuple) or not value:
            _fail(where, "a non-empty list", value)
        return tuple(read(v, where) for v in value)

    return parse


def _axes(value, where):
    # a list of axes, possibly empty (no mirroring)
    if not isinstance(value, list | tuple):
        _fail(where, "a list of axes", value)
    return tuple(_int(0)(v, where) for v in value)


def _dict(value, where):
    return value if isinstance(value, dict) else _fail(where, "an object", value)


def _decisions(value, where):
    if not isinstance(value, list):
        _fail(where, "a list", value)
    out = []
    for item in value:
        if not isinstance(item, dict) or not {"key", "value", "rule"} <= set(item):
            _fail(where, "a list of {key, value, rule, inputs}", item)
        out.append(Decision(item["key"], item["value"], item["rule"], dict(item.get("inputs") or {})))
    return tuple(out)


def _choice(*choices):
    def read(value, where):
        if value not in choices:
            _fail(where, f"one of {', '.join(choices)}", value)
        return value

    return read


_FIELDS = {
    "dataset": _str,
    "fingerprint_hash": _str,
    "device": _str,
    "preset": _choice("default", "resenc_m", "resenc_l"),
    "modalities": _tuple(_str),
    "target_spacing": _tuple(_number(True)),
    "median_shape": _tuple(_number(True)),
    "normalize": _choice("ct", "image", "fingerprint", "minmax", "none"),
    "clip": _str,
    "crop_to_nonzero": _bool,
    "model": _str,
    "patch_size": _tuple(_int(1)),
    "strides": _tuple(_tuple(_int(1))),
    "kernels": _tuple(_tuple(_int(1))),
    "widths": _tuple(_int(1)),
    "deep_supervision": _bool,
    "batch_size": _int(1),
    "foreground_share": _number(False),
    "epochs": _int(1),
    "steps_per_epoch": _int(1),
    "memory_bytes": _number(True),
    "memory_budget_bytes": _number(True),
    "feature_map_elements": _number(True),
    "parameters": _int(1),
    "flops_per_step": _number(True),
    "time_budget_s": _optional(_number(True)),
    "predicted_train_s": _optional(_number(True)),
    "probe": _optional(_dict),
    "bias_field_probability": _number(False),
    "bias_field_pedestal": _tuple(_number(False)),
    "flip_axes": _optional(_axes),
    "decisions": _decisions,
    "version": _int(1),
}
