"""Self-configuration: nnU-Net's rules on synthetic fingerprints, the memory model, the plan
record, the CPU probe, config overrides and a planned run end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from medseg.config import Config
from medseg.planning import (
    ExperimentPlan,
    PlanError,
    PlanOptions,
    parse_duration,
    plan_experiment,
    rules,
    topology,
)
from medseg.planning import memory as mem
from medseg.planning.resolve import apply_plan


def fingerprint(spacing, shape, n=10, classes=3, channels=1, seed=0, spread=0.1):
    """A synthetic fingerprint: ``n`` cases around ``spacing`` and ``shape``."""
    rng = np.random.default_rng(seed)
    spacings = np.asarray(spacing) * rng.uniform(1 - spread, 1 + spread, size=(n, 3))
    shapes = np.round(np.asarray(shape) * rng.uniform(0.9, 1.1, size=(n, 3))).astype(int)
    stats = {"mean": 100.0, "std": 50.0, "percentile_00_5": -50.0, "percentile_99_5": 250.0,
             "median": 100.0, "min": -100.0, "max": 300.0}
    fp = {
        "num_cases": n,
        "class_names": ["background"] + [f"c{i}" for i in range(1, classes)],
        "spacings": spacings.tolist(),
        "shapes": shapes.tolist(),
        "spacing_median": np.median(spacings, 0).tolist(),
        "shape_median": np.median(shapes, 0).tolist(),
        "foreground_intensity": stats,
        # each foreground class: 1 % of every case's voxels
        "class_voxel_counts": [0] + [int(np.prod(shapes, 1).sum() * 0.01)] * (classes - 1),
        "class_case_counts": [n] * classes,
    }
    if channels > 1:
        fp["foreground_intensity_per_channel"] = [stats] * channels
    return fp


def plan(fp, modalities=("CT",), **options):
    return plan_experiment(
        fp, dataset="synthetic", fingerprint_hash="0" * 16, modalities=modalities,
        options=PlanOptions(**options), probe=False,
    )


# -- rules --------------------------------------------------------------------------------


def test_target_spacing_is_the_median_or_the_coarse_axis_10th_percentile():
    spacings = np.array([[1.0, 1.0, 1.0], [1.2, 0.9, 0.9], [0.8, 1.1, 1.1]])
    shapes = np.full((3, 3), 100)
    spacing, rule = rules.target_spacing(spacings, shapes)
    np.testing.assert_allclose(spacing, np.median(spacings, 0))
    assert "median" in rule
    # thick slices: 5 mm over 0.8 mm, few slices → the 10th percentile of the slice axis
    thick = np.column_stack([np.linspace(3.0, 6.0, 11), np.full(11, 0.8), np.full(11, 0.8)])
    shapes = np.tile([40, 512, 512], (11, 1))
    spacing, rule = rules.target_spacing(thick, shapes)
    assert spacing[0] == pytest.approx(np.percentile(thick[:, 0], 10))
    assert spacing[1:] == pytest.approx((0.8, 0.8)) and "10th percentile" in rule


def test_anisotropic_topology_pools_and_convolves_in_plane_first():
    topo, patch = topology((5.0, 0.8, 0.8), (40, 256, 256))
    # the slice axis is not pooled and has 1-sized kernels until the in-plane spacing
    # (0.8 → 1.6 → 3.2 → 6.4 mm) has caught up with it
    assert topo.strides[0] == (1, 1, 1)
    assert topo.strides[1] == (1, 2, 2) and topo.strides[2] == (1, 2, 2)
    assert topo.kernels[0] == (1, 3, 3) and topo.kernels[1] == (1, 3, 3)
    assert topo.kernels[-1] == (3, 3, 3)
    assert any(s[0] == 2 for s in topo.strides[3:])  # later the slice axis is pooled too
    assert all(p % d == 0 for p, d in zip(patch, topo.divisor, strict=True))


def test_isotropic_topology_is_cubic():
    topo, patch = topology((1.0, 1.0, 1.0), (128, 128, 128))
    assert all(len(set(s)) == 1 for s in topo.strides)
    assert all(k == (3, 3, 3) for k in topo.kernels)
    assert topo.num_stages == 6  # 128 → 4 after five poolings
    assert patch == (128, 128, 128)


def test_topology_keeps_every_feature_map_at_least_four():
    for shape in [(20, 60, 44), (96, 160, 160), (8, 8, 8)]:
        topo, patch = topology((1.0, 1.0, 1.0), shape)
        bottom = [p // d for p, d in zip(patch, topo.divisor, strict=True)]
        assert min(bottom) >= 4 or topo.num_stages == 1, (shape, bottom)


@pytest.mark.parametrize(
    "spacing, shape",
    [((1.0, 1.0, 1.0), (36, 50, 35)), ((3.0, 0.75, 0.75), (40, 160, 160)),
     ((5.0, 0.8, 0.8), (60, 512, 512)), ((1.0, 1.0, 1.0), (140, 170, 140))],
)
def test_patch_never_exceeds_the_median_shape_and_strides_divide_it(spacing, shape):
    fp = fingerprint(spacing, shape)
    p = plan(fp, device="gpu", gpu_memory=8)
    resampled = rules.resampled_shape(fp["shapes"], fp["spacings"], p.target_spacing)
    median = np.median(resampled, 0)
    assert all(a <= m for a, m in zip(p.patch_size, median, strict=True)), (p.patch_size, median)
    assert all(a % d == 0 for a, d in zip(p.patch_size, p.topology.divisor, strict=True))
    assert p.batch_size >= 2


def test_memory_estimate_grows_with_the_patch_and_matches_a_hand_count():
    spacing = (1.0, 1.0, 1.0)
    sizes = []
    for edge in (32, 64, 96):
        topo, patch = topology(spacing, (edge,) * 3)
        layers = mem.conv_layers(topo, rules.stage_widths(topo.num_stages), patch, 1, 3)
        sizes.append(mem.feature_map_elements(layers))
    assert sizes[0] < sizes[1] < sizes[2]
    # a 2-stage plain U-Net on 8³, counted by hand: enc0 2 × 8³ × 32, enc1 2 × 4³ × 64,
    # up 8³ × 32, dec0 2 × 8³ × 32, head 8³ × 3
    topo = rules.Topology(((1, 1, 1), (2, 2, 2)), ((3, 3, 3), (3, 3, 3)))
    layers = mem.conv_layers(topo, (32, 64), (8, 8, 8), 1, 3)
    v0, v1 = 8**3, 4**3
    assert mem.feature_map_elements(layers) == 2 * v0 * 32 + 2 * v1 * 64 + v0 * 32 + 2 * v0 * 32 + v0 * 3
    # parameters: the same count as Keras's for the built network (no norm, no bias)
    assert mem.parameter_count(layers) == (
        27 * (1 * 32 + 32 * 32) + 27 * (32 * 64 + 64 * 64) + 8 * 64 * 32
        + 27 * (64 * 32 + 32 * 32) + 32 * 3
    )


def test_a_larger_gpu_plans_a_larger_patch_or_batch():
    fp = fingerprint((1.6, 0.8, 0.8), (200, 400, 400))
    small, large = plan(fp, device="gpu", gpu_memory=8), plan(fp, device="gpu", gpu_memory=24)
    assert math.prod(large.patch_size) * large.batch_size > math.prod(small.patch_size) * small.batch_size
    assert small.memory_bytes < large.memory_bytes <= 24e9 * 1.05
    assert small.epochs * small.steps_per_epoch == 1000 * 250  # the GPU schedule


def test_normalisation_follows_the_modality():
    ct = plan(fingerprint((1, 1, 1), (64, 64, 64)), device="gpu")
    mr = plan(fingerprint((1, 1, 1), (64, 64, 64), channels=4), modalities=("FLAIR", "T1w", "t1gd", "T2w"), device="gpu")
    assert (ct.normalize, ct.clip, ct.crop_to_nonzero) == ("ct", "fingerprint", False)
    assert (mr.normalize, mr.clip, mr.crop_to_nonzero) == ("image", "none", True)
    assert mr.modalities == ("FLAIR", "T1w", "t1gd", "T2w")
    # MR trains under random coil-bias fields, CT (physical HU) does not
    assert (ct.bias_field_probability, mr.bias_field_probability) == (0.0, 0.5)
    assert mr.config_values()["augment.bias_field_probability"] == 0.5


def test_a_plan_written_before_the_bias_field_rule_still_reads_and_runs_without_it(tmp_path):
    p = plan(fingerprint((1, 1, 1), (64, 64, 64)), modalities=("T1",), device="gpu")
    values = p.to_dict()
    del values["bias_field_probability"]
    old = ExperimentPlan.from_dict(values)
    assert old.bias_field_probability == 0.0 and old.config_values()["augment.bias_field_probability"] == 0.0


def test_deep_supervision_from_four_stages():
    assert plan(fingerprint((1, 1, 1), (128, 128, 128)), device="gpu").deep_supervision
    assert not plan(fingerprint((1, 1, 1), (12, 12, 12)), device="gpu").deep_supervision


# -- bad input ----------------------------------------------------------------------------


def test_cases_smaller_than_the_minimum_patch_are_refused_with_the_numbers():
    with pytest.raises(PlanError, match=r"smallest case is \(\d+, \d+, \d+\).*minimum patch of 8"):
        plan(fingerprint((1, 1, 1), (5, 40, 40)), device="gpu")


def test_gpu_memory_below_the_smallest_network_is_refused():
    with pytest.raises(PlanError, match=r"GPU memory 0.001 GB is below the smallest network's estimate"):
        plan(fingerprint((1, 1, 1), (64, 64, 64)), device="gpu", gpu_memory=0.001)


def test_a_time_budget_too_small_for_any_plan_is_refused_naming_the_limit():
    with pytest.raises(PlanError, match=r"time budget 1 s is too small.*200 steps, the minimum"):
        plan(fingerprint((1, 1, 1), (64, 64, 64)), device="cpu", time_budget_s=1)


def test_durations_parse_and_bad_ones_are_refused():
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90 and parse_duration("2.5m") == 150
    assert parse_duration(None) is None and parse_duration(12) == 12
    with pytest.raises(PlanError, match="time budget 'ten'"):
        parse_duration("ten")


# -- the time budget on a CPU -------------------------------------------------------------


def test_cpu_budget_buys_more_steps_or_a_bigger_network():
    fp = fingerprint((3.0, 0.75, 0.75), (40, 160, 160), n=16)
    # the slow CPU's throughput, assumed: the outcome must not depend on the machine
    slow = {"device": "cpu", "conv_gflops": 25.0}
    short, long = plan(fp, time_budget_s=300, **slow), plan(fp, time_budget_s=3000, **slow)
    work = lambda p: p.total_steps * p.flops_per_step  # noqa: E731
    assert work(long) > 5 * work(short)
    for p in (short, long):
        assert p.predicted_train_s <= p.time_budget_s
        assert p.probe["conv_gflops"] == 25.0 and not p.probe["measured"]
        assert p.total_steps >= 200


def test_cpu_probe_times_a_tiny_planned_network():
    from medseg.planning.planner import _candidate, _probe_step

    cand = _candidate((1.0, 1.0, 1.0), (16, 16, 16), 4, 2, 1, 3, "default")
    seconds = _probe_step(cand, 1, 3, "default")
    assert 0 < seconds < 30


def test_conv_throughput_is_measured():
    from medseg.planning.probe import measure_conv_throughput

    result = measure_conv_throughput(repeats=2, warmup=1)
    flops = 3 * 2 * (2 * 32 * 64 * 64) * 27 * 16 * 16
    assert result["gflops"] == pytest.approx(flops / result["seconds_per_step"] / 1e9)


# -- the record ---------------------------------------------------------------------------


def test_plan_round_trips_through_json(tmp_path):
    p = plan(fingerprint((5.0, 0.8, 0.8), (60, 300, 300)), device="gpu")
    path = p.save(tmp_path / "plan.json")
    again = ExperimentPlan.load(path)
    assert again == p
    assert again.topology.divisor == p.topology.divisor


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "field 'batch_size' must be an integer ≥ 1"),
        ("patch_size", [30, 64, 64], "field 'patch_size' .* not a multiple"),
        ("strides", "2,2", "field 'strides' must be a non-empty list"),
        ("preset", "huge", "field 'preset' must be one of default, resenc_m, resenc_l"),
        ("version", 99, "field 'version' is 99"),
    ],
)
def test_an_edited_invalid_plan_is_refused_naming_the_field(tmp_path, field, value, message):
    p = plan(fingerprint((1, 1, 1), (64, 64, 64)), device="gpu")
    values = p.to_dict()
    values[field] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(values))
    with pytest.raises(PlanError, match=rf"plan file {path}: {message}"):
        ExperimentPlan.load(path)


# -- networks from the plan ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain_unet", "resenc_unet", "unet", "attention_unet"])
def test_networks_take_the_plans_anisotropic_strides_and_kernels(name):
    from medseg.models import build_model

    topo, patch = topology((4.0, 1.0, 1.0), (8, 32, 32))
    model = build_model(
        name, num_classes=3, in_channels=1, ndim=3, strides=topo.strides, kernels=topo.kernels,
        widths=rules.stage_widths(topo.num_stages, base=4), deep_supervision=topo.num_stages >= 3,
    )
    assert model.stride == topo.divisor
    out = model(np.zeros((1, *patch, 1), np.float32))
    out = out[0] if isinstance(out, list | tuple) else out
    assert tuple(out.shape) == (1, *patch, 3)
    kernels = {tuple(layer.kernel_size) for layer in model.layers if layer.name.startswith("enc0_conv")}
    assert kernels == {tuple(topo.kernels[0])}
    with pytest.raises(ValueError, match="divisible by the model's stride"):
        model(np.zeros((1, patch[0], patch[1] + 1, patch[2], 1), np.float32))


def test_resenc_unet_has_the_published_blocks_per_stage():
    from medseg.models import build_model

    topo, _ = topology((1.0, 1.0, 1.0), (64, 64, 64))
    model = build_model(
        "resenc_unet", num_classes=2, strides=topo.strides, kernels=topo.kernels,
        widths=rules.stage_widths(topo.num_stages, base=4),
    )
    adds = [layer.name for layer in model.layers if layer.name.endswith("_add")]
    per_stage = [sum(name.startswith(f"enc{s}_") for name in adds) for s in range(topo.num_stages)]
    assert per_stage == [1, 3, 4, 6, 6][: topo.num_stages]


# -- the config and the plan --------------------------------------------------------------


def test_explicit_config_keys_override_the_plan_and_are_recorded():
    fp = fingerprint((1.0, 1.0, 1.0), (64, 64, 64))
    p = plan(fp, device="gpu")
    config = Config().with_overrides({"patch.batch_size": 5, "train.epochs": 3})
    resolved, run_plan, overrides = apply_plan(config, p, fp)
    assert resolved.patch.batch_size == 5 and resolved.train.epochs == 3
    assert resolved.patch.patch_size == p.patch_size  # planned, not the config default
    assert resolved.model.name == "plain_unet" and resolved.preprocess.normalize == "ct"
    assert overrides == {
        "patch.batch_size": {"planned": p.batch_size, "used": 5},
        "train.epochs": {"planned": p.epochs, "used": 3},
    }
    assert run_plan.batch_size == 5 and run_plan.topology == p.topology


def test_an_overridden_patch_gets_its_own_topology_or_a_clear_error():
    fp = fingerprint((4.0, 1.0, 1.0), (40, 128, 128))
    p = plan(fp, device="gpu")
    config = Config().with_overrides({"patch.patch_size": [8, 32, 32]})
    resolved, run_plan, _ = apply_plan(config, p, fp)
    assert run_plan.patch_size == (8, 32, 32)
    assert all(a % d == 0 for a, d in zip(run_plan.patch_size, run_plan.topology.divisor, strict=True))
    with pytest.raises(PlanError, match=r"patch.patch_size=\[9, 32, 32\] is not a multiple"):
        apply_plan(Config().with_overrides({"patch.patch_size": [9, 32, 32]}), p, fp)


# -- a planned run end to end -------------------------------------------------------------


@pytest.mark.slow
def test_planned_run_logs_its_plan_and_reproduce_reuses_it(tiny_data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from medseg import datasets
    from medseg.tracking import run_training
    from medseg.tracking.reproduce import reproduce

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # a budget the smallest network fits on the slowest CPU too (~25 GFLOP/s): only the plan
    # uses it, the run itself is cut to 1 × 2 steps
    config = Config().with_overrides({
        "data.config": "tiny", "data.data_dir": tiny_data_dir, "plan.time_budget": "3m",
        # explicit keys win over the plan, and are recorded as overrides
        "train.epochs": 1, "train.steps_per_epoch": 2, "patch.validation_patches": 1,
        "augment.jit": False, "tracking.tracking_uri": uri,
        "tracking.artifact_root": str(tmp_path), "tracking.log_model": False,
    })
    result, run_id = run_training(config)
    setup = result.data
    plan = setup.experiment_plan  # as it ran: the overrides applied
    builder = datasets.get_builder("kits_phantom", "tiny", tiny_data_dir)
    # as planned, cached beside the dataset (other tests cache plans of other budgets there)
    cached = sorted((Path(builder.data_dir) / "plans").glob("*.json"), key=os.path.getmtime)
    planned = [
        p for p in map(ExperimentPlan.load, cached)
        if p.time_budget_s == 180 and (p.probe or {}).get("measured")  # not a --no-probe plan
    ][-1]
    assert (plan.epochs, plan.steps_per_epoch) == (1, 2) and planned.total_steps >= 200
    assert plan.predicted_train_s is None  # the planned prediction is of another schedule
    assert plan.with_values(
        epochs=planned.epochs, steps_per_epoch=planned.steps_per_epoch,
        predicted_train_s=planned.predicted_train_s,
    ) == planned
    assert result.config.patch.patch_size == plan.patch_size
    assert result.config.model.name == "plain_unet" and result.config.preprocess.normalize == "ct"
    assert set(setup.overrides) == {"train.epochs", "train.steps_per_epoch"}
    assert plan.probe["measured"] and plan.probe["seconds_per_step"] > 0

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["medseg.plan.overrides"] == "train.epochs, train.steps_per_epoch"
    assert json.loads(run.data.params["patch.patch_size"]) == list(plan.patch_size)
    assert json.loads(run.data.params["plan.strides"]) == [list(s) for s in plan.strides]
    logged = ExperimentPlan.load(client.download_artifacts(run_id, "experiment_plan.json", str(tmp_path)))
    assert logged == plan
    overrides = json.loads(
        Path(client.download_artifacts(run_id, "plan_overrides.json", str(tmp_path))).read_text()
    )
    assert overrides["train.epochs"] == {"planned": planned.epochs, "used": 1}

    # reproduce must not plan again: with the cache gone, a re-plan would write a new one
    # (and time this machine anew)
    assert planned.probe == plan.probe
    for path in cached:
        path.unlink()
    again = reproduce(run_id, uri)
    new_plan = ExperimentPlan.load(
        client.download_artifacts(again.run_id, "experiment_plan.json", str(tmp_path / "again"))
    )
    assert new_plan == plan  # probe figures included: nothing was timed again
    assert not list((Path(builder.data_dir) / "plans").glob("*.json"))
    assert client.get_run(again.run_id).data.tags["medseg.reproduce.plan"].endswith(
        f"{run_id}/experiment_plan.json"
    )


def test_medseg_plan_writes_an_explained_plan_and_refuses_a_tiny_budget(tiny_data_dir, tmp_path, capsys):
    from medseg.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "kits_phantom", "--config", "tiny", "--data-dir", tiny_data_dir,
                 "--time-budget", "5m", "--no-probe", "--explain", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    plan = ExperimentPlan.load(out)
    assert "preprocess.target_spacing" in text and "anisotropic" in text or "median" in text
    assert f"{plan.epochs}" in text and "GFLOP/s" in text
    assert plan.dataset == "kits_phantom/tiny/1.1.0" and plan.modalities == ("CT",)
    assert plan.predicted_train_s <= 300
    assert main(["plan", "kits_phantom", "--config", "tiny", "--data-dir", tiny_data_dir,
                 "--time-budget", "1s", "--no-probe"]) == 2
    assert "time budget 1 s is too small" in capsys.readouterr().err


def test_low_resolution_only_where_the_patch_cannot_hold_the_structures():
    from medseg.planning.planner import LOWRES_COVERAGE, lowres_spacing

    brain = fingerprint((1.0, 1.0, 1.0), (180, 216, 180), n=1, spread=0.0)
    small = fingerprint((3.0, 0.75, 0.75), (40, 160, 160), n=1, spread=0.0)
    # lobes: ~4 × 10⁵ voxels each; phantom kidneys: ~10⁴
    brain["class_voxel_counts"], brain["class_case_counts"] = [5_000_000, 400_000, 300_000], [1, 1, 1]
    small["class_voxel_counts"], small["class_case_counts"] = [1_000_000, 12_000, 2_000], [1, 1, 1]
    patch = (48, 56, 40)
    spacing, why = lowres_spacing(brain, (1.0, 1.0, 1.0), (180, 216, 180), patch)
    assert 1.5 < spacing[0] < 3.0 and len(set(spacing)) == 1 and "low resolution" in why
    scale = np.prod(spacing)
    # nnU-Net's loop: it stops once the patch covers 25 % of the median case, not before
    coverage = np.prod(patch) / (180 * 216 * 180 / scale)
    assert LOWRES_COVERAGE <= coverage < LOWRES_COVERAGE * 1.03**3 * 1.01
    assert lowres_spacing(small, (3.0, 0.75, 0.75), (40, 160, 160), (16, 80, 64)) is None


def test_mirroring_drops_the_axes_the_classes_are_laid_out_along():
    fp = fingerprint((1.0, 1.0, 1.0), (100, 120, 100), n=3, classes=8)
    # brain lobes (Colin27): laid out front to back and bottom to top, bilateral left-right
    fp["class_layouts"] = [[0.02, 0.76, 0.64], [0.03, 0.70, 0.60], [0.01, 0.80, 0.66]]
    lobes = plan(fp, modalities=("T1",))
    assert lobes.flip_axes == (0,)
    assert lobes.config_values()["augment.flip_axes"] == [0]
    why = next(d for d in lobes.decisions if d.key == "augment.flip_axes")
    assert "not axis 1, 2" in why.rule and why.inputs["class_layout_median"] == [0.02, 0.76, 0.64]
    # kidneys and tumours (the phantom's medians): nnU-Net's every axis
    fp["class_layouts"] = [[0.016, 0.023, 0.127]] * 3
    assert plan(fp).flip_axes == (0, 1, 2)
    # an older fingerprint without layouts: every axis, saying why
    del fp["class_layouts"]
    older = plan(fp)
    assert older.flip_axes == (0, 1, 2)
    assert "rebuild" in next(d for d in older.decisions if d.key == "augment.flip_axes").rule


def test_mr_plans_draw_a_bias_pedestal_and_ct_plans_none(tmp_path):
    from medseg.planning import ExperimentPlan

    fp = fingerprint((1.0, 1.0, 1.0), (64, 64, 64), n=4)
    mr, ct = plan(fp, modalities=("T1",)), plan(fp, modalities=("CT",))
    assert mr.bias_field_pedestal == (0.0, 2.0) and ct.bias_field_pedestal == (0.0, 0.0)
    assert mr.config_values()["augment.bias_field_pedestal"] == [0.0, 2.0]
    path = mr.save(tmp_path / "plan.json")
    again = ExperimentPlan.load(path)
    assert again.bias_field_pedestal == mr.bias_field_pedestal
    assert again.flip_axes == mr.flip_axes
    values = again.to_dict()
    values["flip_axes"] = [0, 3]
    with pytest.raises(PlanError, match="field 'flip_axes' \\[0, 3\\] names an axis"):
        ExperimentPlan.from_dict(values, where="edited.json")
    values["flip_axes"] = [0]
    values["bias_field_pedestal"] = [1.0, 0.5]
    with pytest.raises(PlanError, match="edited.json: field 'bias_field_pedestal' must be"):
        ExperimentPlan.from_dict(values, where="edited.json")
