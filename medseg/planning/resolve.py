"""Where a run's config and its plan meet.

:func:`resolve_plan` gives every run its :class:`ExperimentPlan`: planned (or read from
the cache beside the dataset) with ``plan.mode=auto``, read from a file with
``plan.mode=<plan.json>`` (never re-planned: what ``medseg reproduce`` uses), or made
from the config's own values with ``plan.mode=none``. :func:`apply_plan` then writes the
planned values into the config wherever the config did not set them explicitly, and
returns the overrides, which the run records.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medseg.config import Config
from medseg.datasets.fingerprint import Fingerprint
from medseg.planning import memory, rules
from medseg.planning.planner import (
    PlanOptions,
    cache_path,
    network_parts,
    parse_duration,
    plan_experiment,
    resolve_device,
)
from medseg.planning.record import Decision, ExperimentPlan, PlanError

__all__ = ["apply_plan", "plan_from_config", "plan_options", "resolve_plan"]

log = logging.getLogger(__name__)


def plan_options(config: Config) -> PlanOptions:
    """The planner's options from the ``plan.*`` (and validation) config keys."""
    options = PlanOptions(
        device=config.plan.device,
        gpu_memory=config.plan.gpu_memory,
        time_budget_s=parse_duration(config.plan.time_budget),
        preset=config.plan.preset,
        validation_fraction=config.data.validation_fraction,
        validation_patches=config.patch.validation_patches,
    )
    options.check()
    return options


def resolve_plan(
    config: Config,
    fingerprint: dict[str, Any],
    *,
    dataset: str,
    fingerprint_hash: str,
    modalities: tuple[str, ...],
    cache_dir: str | Path | None = None,
) -> ExperimentPlan:
    """The plan of this run, as ``config.plan.mode`` says.

    Parameters
    ----------
    cache_dir : path, optional
        The dataset's folder: ``plans/`` under it caches auto plans per machine and
        budget, so a dataset is planned (and its network timed) once.
    """
    mode = config.plan.mode
    if mode == "none":
        return plan_from_config(config, fingerprint, dataset, fingerprint_hash, modalities)
    if mode != "auto":
        plan = ExperimentPlan.load(mode)
        if plan.fingerprint_hash != fingerprint_hash:
            raise PlanError(
                f"plan file {mode}: field 'fingerprint_hash' is {plan.fingerprint_hash}, the "
                f"dataset {dataset} has {fingerprint_hash}: the plan is of other data"
            )
        return plan
    options = plan_options(config)
    path = None
    if cache_dir is not None:
        device = resolve_device(options.device)
        path = cache_path(cache_dir, dataset, fingerprint_hash, options, device)
        if path.is_file():
            try:
                return ExperimentPlan.load(path)
            except (PlanError, FileNotFoundError) as err:  # a stale or damaged cache entry
                log.warning("re-planning: %s", err)
    plan = plan_experiment(
        fingerprint, dataset=dataset, fingerprint_hash=fingerprint_hash,
        modalities=modalities, options=options,
    )
    if path is not None:
        try:
            plan.save(path)
        except OSError as err:  # a read-only dataset folder: plan again next time
            log.warning("could not cache the plan in %s: %s", path, err)
    return plan


def plan_from_config(
    config: Config,
    fingerprint: dict[str, Any],
    dataset: str,
    fingerprint_hash: str,
    modalities: tuple[str, ...],
) -> ExperimentPlan:
    """A plan of the config's own values (``plan.mode=none``): the legacy isotropic U-Net
    of ``model.depth`` levels, every decision "set by the config"."""
    pre, patch, model = config.preprocess, config.patch, config.model
    ndim = len(patch.patch_size)
    depth = model.depth
    strides = ((1,) * ndim,) + ((2,) * ndim,) * (depth - 1)
    topo = rules.Topology(strides, ((3,) * ndim,) * depth)
    widths = tuple(min(model.filters * 2**s, 320) for s in range(depth))
    spacing = pre.target_spacing or Fingerprint.of(fingerprint).spacing_median or (1.0,) * ndim
    return _record(
        config, fingerprint, dataset, fingerprint_hash, modalities, topo, widths,
        tuple(float(s) for s in spacing), "config",
    )


def _record(config, fingerprint, dataset, fingerprint_hash, modalities, topo, widths,
            spacing, rule, base: ExperimentPlan | None = None) -> ExperimentPlan:
    """An ExperimentPlan of the config's values with ``topo`` and ``widths``."""
    pre, patch, model, train = config.preprocess, config.patch, config.model, config.train
    fingerprint = Fingerprint.of(fingerprint, f"fingerprint of {dataset}")
    num_classes, in_channels = fingerprint.num_classes, len(fingerprint.intensity_channels)
    blocks, decoder = network_parts(model.name)
    layers = memory.conv_layers(
        topo, widths, patch.patch_size, in_channels, num_classes, encoder_blocks=blocks,
        decoder_convs=decoder,
    )
    elements = memory.feature_map_elements(layers)
    params = memory.parameter_count(layers)
    values = dict(
        dataset=dataset,
        fingerprint_hash=fingerprint_hash,
        device=base.device if base else "cpu",
        preset=base.preset if base else "default",
        modalities=tuple(modalities) or ("unknown",),
        target_spacing=spacing,
        median_shape=base.median_shape if base else (
            fingerprint.shape_median or tuple(float(v) for v in patch.patch_size)
        ),
        normalize=pre.normalize,
        clip=pre.clip if isinstance(pre.clip, str) else f"{pre.clip[0]:g},{pre.clip[1]:g}",
        crop_to_nonzero=pre.crop_to_nonzero,
        model=model.name,
        patch_size=tuple(int(p) for p in patch.patch_size),
        strides=topo.strides,
        kernels=topo.kernels,
        widths=tuple(widths),
        deep_supervision=model.deep_supervision,
        batch_size=patch.batch_size,
        foreground_share=patch.foreground_share,
        epochs=train.epochs,
        steps_per_epoch=train.steps_per_epoch,
        memory_bytes=memory.memory_bytes(elements, patch.batch_size, params, True),
        memory_budget_bytes=base.memory_budget_bytes if base else 1.0,
        feature_map_elements=elements,
        parameters=params,
        flops_per_step=memory.training_flops(layers, patch.batch_size),
        time_budget_s=base.time_budget_s if base else None,
        # the planned prediction holds only for the planned schedule
        predicted_train_s=base.predicted_train_s if base and (train.epochs, train.steps_per_epoch)
        == (base.epochs, base.steps_per_epoch) else None,
        probe=base.probe if base else None,
        bias_field_probability=config.augment.bias_field_probability,
        bias_field_pedestal=tuple(float(v) for v in config.augment.bias_field_pedestal),
        flip_axes=tuple(int(a) for a in config.augment.flip_axes),
    )
    if base is None:
        values["decisions"] = tuple(
            Decision(k, v, "set by the config (plan.mode=none)") for k, v in
            ExperimentPlan(**values).config_values().items()
        )
    else:
        values["decisions"] = base.decisions
    return ExperimentPlan(**values)


def apply_plan(
    config: Config, plan: ExperimentPlan, fingerprint: dict[str, Any]
) -> tuple[Config, ExperimentPlan, dict[str, dict[str, Any]]]:
    """The config with the plan's values where it left them unset, and the plan as run.

    A key the config sets explicitly wins over the plan; where such a key shapes the
    network (target spacing, patch, depth, filters), the topology is derived again with
    nnU-Net's rules from what is used, so model and plan agree.

    Returns
    -------
    config : Config
        Every planned key resolved (all explicit keys kept).
    plan : ExperimentPlan
        The plan as it will run: ``plan`` itself, or with the overridden values.
    overrides : dict
        ``{key: {"planned": value, "used": value}}`` for every explicit key that differs.
    """
    if config.plan.mode == "none":
        return config, plan, {}
    planned = plan.config_values()
    explicit = config.explicit_keys
    flat = config.to_flat_dict()
    overrides, values = {}, {}
    for key, value in planned.items():
        if key in explicit:
            used = flat[key]
            if _norm(used) != _norm(value):
                overrides[key] = {"planned": value, "used": used}
        else:
            values[key] = value
    resolved = config.with_overrides(values)._with_explicit(explicit)
    if not overrides:
        return resolved, plan, {}
    shaping = {"preprocess.target_spacing", "patch.patch_size", "model.depth", "model.filters",
               "model.name"}
    if not shaping & set(overrides):
        return resolved, _replace_run_values(plan, resolved, fingerprint), overrides
    spacing = tuple(float(s) for s in (resolved.preprocess.target_spacing or plan.target_spacing))
    depth = resolved.model.depth
    topo, padded = rules.topology(spacing, resolved.patch.patch_size, max_stages=depth)
    if topo.num_stages < depth and "model.depth" in overrides:
        # the rules stop pooling earlier: pool the axes the plan's last stage pooled
        strides = list(topo.strides) + [plan.strides[-1]] * (depth - topo.num_stages)
        kernels = list(topo.kernels[:-1]) + [(3,) * len(spacing)] * (depth - topo.num_stages + 1)
        topo = rules.Topology(tuple(strides), tuple(kernels))
        padded = tuple(
            -(-p // d) * d for p, d in zip(resolved.patch.patch_size, topo.divisor, strict=True)
        )
    if tuple(padded) != tuple(resolved.patch.patch_size):
        raise PlanError(
            f"patch.patch_size={list(resolved.patch.patch_size)} is not a multiple of the "
            f"network's per-axis total stride {list(topo.divisor)} (strides "
            f"{[list(s) for s in topo.strides]} at spacing {list(spacing)}): use e.g. "
            f"{list(padded)}"
        )
    if "model.deep_supervision" not in explicit:  # the planned rule, on the stages used
        deep = topo.num_stages >= 4
        resolved = resolved.with_overrides({"model.deep_supervision": deep})._with_explicit(explicit)
    widths = rules.stage_widths(topo.num_stages, len(spacing), resolved.model.filters)
    run_plan = _record(
        resolved, fingerprint, plan.dataset, plan.fingerprint_hash, plan.modalities, topo,
        widths, spacing, "override", base=plan,
    )
    return resolved, run_plan, overrides


def _replace_run_values(plan, config, fingerprint) -> ExperimentPlan:
    return _record(
        config, fingerprint, plan.dataset, plan.fingerprint_hash, plan.modalities,
        plan.topology, plan.widths, plan.target_spacing, "override", base=plan,
    )


def _norm(value):
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


