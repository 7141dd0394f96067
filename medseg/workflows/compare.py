"""A variant study: one config key, several values, each a cross-validation on the same folds.

The core of ``medseg compare``, free of tracking. :func:`parse_variants` turns
``model.name=unet,residual_unet`` into one config per value; every variant shares the
plan, the saved folds and the seeds (keys that would change them cannot be compared).
:func:`run_study` runs each variant through :func:`~medseg.workflows.run_cross_validation`
and :func:`compare_variants` pairs their per-case scores: a table of per-structure Dice and
HD95 (mean ± std over cases), paired Wilcoxon signed-rank tests of each variant against the
baseline on per-case Dice, Holm-corrected (:func:`holm`), and mean ranks per case
(:func:`mean_ranks`, with Nemenyi's critical difference). A :class:`StudyObserver`
(:class:`medseg.tracking.compare.MlflowStudy`) records it and gives back the variants an
interrupted study finished.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from medseg.config import Config, ConfigError
from medseg.io.atomic import write_atomically
from medseg.workflows.cross_validation import CrossValidationResult, run_cross_validation
from medseg.workflows.observer import Observer

__all__ = [
    "Comparison",
    "StudyObserver",
    "Variant",
    "VariantResult",
    "compare_variants",
    "critical_difference",
    "holm",
    "mean_ranks",
    "parse_variants",
    "run_study",
    "variant_result",
    "write_comparison",
]

# keys whose values decide the cases, the folds or the seeds (or where results go): a
# variant study compares models on the same folds, so these stay the study's own
FIXED_KEYS = ("data.", "evaluation.protocol", "evaluation.folds", "evaluation.splits_file",
              "evaluation.test_split", "evaluation.train_cases", "evaluation.test_cases",
              "seed", "tracking.")

# Nemenyi's two-tailed q_0.05 (studentized range / sqrt 2) for k = 2..10 (Demšar 2006)
NEMENYI_Q05 = (1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164)


@dataclass
class Variant:
    """One value of the compared key and the config it runs with."""

    label: str
    value: Any
    config: Config


@dataclass
class VariantResult:
    """What a variant's cross-validation gives the comparison: per-case scores pooled over
    its folds, its network's parameter count and its training time (sum over folds)."""

    label: str
    cases: dict[str, dict[str, float]]  # case id -> {"dice_kidney": .., "hd95_kidney": ..}
    parameters: int | None = None
    train_s: float | None = None
    run_id: str | None = None


@dataclass
class Comparison:
    """The study's results; ``rows`` is the table (one row per variant and structure)."""

    key: str
    baseline: str
    labels: list[str]
    structures: list[str]
    cases: list[str]
    rows: list[dict[str, Any]]
    tests: list[dict[str, Any]]
    ranks: dict[str, float]
    critical_difference: float | None
    variants: dict[str, VariantResult] = field(default_factory=dict)

    def markdown(self) -> str:
        """The table as Markdown: Dice and HD95 as mean ± std, p-values against the baseline."""
        lines = [
            f"Variants of `{self.key}` (baseline `{self.baseline}`), {len(self.cases)} paired cases",
            "",
            "| variant | structure | Dice | HD95 | p (Wilcoxon) | p (Holm) | parameters | train s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['variant']} | {r['structure']} | {_pm(r['dice_mean'], r['dice_std'])} | "
                f"{_pm(r['hd95_mean'], r['hd95_std'])} | {_num(r['p_wilcoxon'])} | "
                f"{_num(r['p_holm'])} | {r['parameters'] if r['parameters'] is not None else ''} | "
                f"{_num(r['train_s'], '.1f')} |"
            )
        lines += ["", "Mean rank per case (1 = best mean Dice over structures):", ""]
        lines += [f"- {label}: {rank:.3f}" for label, rank in self.ranks.items()]
        if self.critical_difference is not None:
            lines.append(f"- Nemenyi critical difference (α = 0.05): {self.critical_difference:.3f}")
        return "\n".join(lines) + "\n"


def _num(value, spec: str = ".4g") -> str:
    return "" if value is None or not math.isfinite(value) else format(value, spec)


def _pm(mean, std) -> str:
    return f"{_num(mean)} ± {_num(std)}" if math.isfinite(mean) else ""


# -- the variants ------------------------------------------------------------------------


def _split_values(text: str) -> list[str]:
    """Comma-separated values, commas inside brackets kept: ``[8,16,16],[16,16,16]``."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_variants(
    config: Config, spec: str | tuple[str, Sequence[Any]], baseline: str | None = None
) -> tuple[str, list[Variant], str]:
    """The variants of ``spec``: one config per value of one config key.

    Parameters
    ----------
    config : Config
        The study's config; each variant is it with the key replaced.
    spec : str or (str, sequence)
        ``"model.name=unet,residual_unet"`` (values parsed as the key's type, commas inside
        brackets kept) or ``("model.name", ["unet", "residual_unet"])``.
    baseline : str, optional
        The label (value as written) the others are tested against; default the first.

    Returns
    -------
    key : str
    variants : list of Variant
    baseline : str

    Raises
    ------
    ConfigError
        Naming the key: not of the form key=a,b; an unknown key; fewer than two or repeated
        values; a value the key does not take; a key that would change the folds or seeds;
        a baseline that is not one of the values.
    """
    if isinstance(spec, str):
        if "=" not in spec:
            raise ConfigError(
                f"compare: {spec!r} is not of the form section.key=value1,value2 "
                "(e.g. model.name=unet,residual_unet)"
            )
        key, _, text = spec.partition("=")
        key, values = key.strip(), _split_values(text)
    else:
        key, values = spec[0], list(spec[1])
    labels = [v if isinstance(v, str) else json.dumps(v) for v in values]
    if key not in config.to_flat_dict():
        try:  # its message: "unknown config key 'model.nme'; did you mean 'model.name'?"
            Config().with_overrides({key: ""})
        except ConfigError as err:
            raise ConfigError(f"compare: {err}") from None
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in FIXED_KEYS):
        raise ConfigError(
            f"compare: config key {key!r} cannot be compared: every variant runs on the same "
            "cases, folds and seeds (data.*, evaluation protocol/folds/splits, seed and "
            "tracking.* are the study's own); set it as an ordinary override instead"
        )
    if len(values) < 2 or any(label == "" for label in labels):
        raise ConfigError(
            f"compare: config key {key!r} has {len([v for v in labels if v])} value(s) "
            f"({', '.join(labels)}); give two or more, comma-separated, e.g. "
            f"{key}=a,b"
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(
            f"compare: config key {key!r} lists {', '.join(map(repr, repeated))} more than "
            "once; give each value once"
        )
    baseline = labels[0] if baseline is None else str(baseline)
    if baseline not in labels:
        raise ConfigError(
            f"compare: baseline {baseline!r} is not one of the values of config key {key!r} "
            f"({', '.join(labels)})"
        )
    variants = []
    for label, value in zip(labels, values, strict=True):
        try:  # the key's own check, e.g. "'model.name': 'unet3' is not one of ..."
            variants.append(Variant(label, value, config.with_overrides({key: value})))
        except ConfigError as err:
            raise ConfigError(f"compare: value {label!r} of {key!r}: {err}") from None
    return key, variants, baseline


# -- statistics --------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control).

    With the m finite p-values sorted, p_(1) <= ... <= p_(m), the adjusted value of the
    i-th is ``max_{j <= i} min(1, (m - j + 1) * p_(j))``; rejecting adjusted p <= α
    controls the family-wise error rate at α (Holm 1979).

    Parameters
    ----------
    pvalues : sequence of float
        One per hypothesis; NaN (a test that could not be made) stays NaN and does not
        count in m.

    Returns
    -------
    adjusted : ndarray
        In the order of ``pvalues``.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for j, index in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[index]))
        adjusted[index] = running
    return adjusted


def mean_ranks(scores: np.ndarray) -> np.ndarray:
    """Mean rank of each variant over cases, rank 1 the highest score of a case.

    Parameters
    ----------
    scores : ndarray, shape (cases, variants)
        Higher is better (Dice); ties get their average rank. Cases with a NaN are left out.

    Returns
    -------
    ranks : ndarray, shape (variants,)
    """
    scores = np.asarray(scores, dtype=float)
    scores = scores[np.all(np.isfinite(scores), axis=1)]
    if not len(scores):
        return np.full(scores.shape[1], np.nan)
    return stats.rankdata(-scores, axis=1).mean(axis=0)


def critical_difference(variants: int, cases: int) -> float | None:
    """Nemenyi's critical difference of mean ranks at α = 0.05, ``q sqrt(k(k+1) / 6N)``
    (None outside the tabulated 2..10 variants, or without cases)."""
    if not 2 <= variants <= len(NEMENYI_Q05) + 1 or cases < 1:
        return None
    return NEMENYI_Q05[variants - 2] * math.sqrt(variants * (variants + 1) / (6 * cases))


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value of ``a`` against ``b``; NaN when no
    pair differs (no test to make)."""
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if not len(a) or np.all(a == b):
        return math.nan
    return float(stats.wilcoxon(a, b).pvalue)


def structures_of(cases: dict[str, dict[str, float]]) -> list[str]:
    """The structures scored (``dice_<structure>`` keys), sorted: the same order whether
    the scores come from a run just made or from a table read back."""
    return sorted({key[5:] for scores in cases.values() for key in scores
                   if key.startswith("dice_")})


def compare_variants(
    key: str, results: Sequence[VariantResult], baseline: str
) -> Comparison:
    """Pair the variants' per-case scores and test each against the baseline.

    Parameters
    ----------
    key : str
        The compared config key.
    results : sequence of VariantResult
        In study order; every variant must have scored the same cases.
    baseline : str
        Label of the variant the others are tested against.

    Returns
    -------
    Comparison
        ``rows``: per variant and structure Dice and HD95 mean ± std (population std, as
        :func:`medseg.evaluation.metrics.summarize`), the paired Wilcoxon p-value on per-case
        Dice against the baseline and its Holm adjustment (over the variants, per
        structure), parameters and training time. ``ranks``: mean rank per case of the
        per-case mean Dice over structures.
    """
    by_label = {r.label: r for r in results}
    cases = sorted(by_label[baseline].cases)
    for r in results:
        if sorted(r.cases) != cases:
            raise ValueError(
                f"compare: variant {r.label!r} scored other cases than the baseline "
                f"{baseline!r} ({len(r.cases)} vs {len(cases)}); the variants must share the "
                "folds: run the study again with one splits file"
            )
    structures = structures_of(by_label[baseline].cases)

    def column(label: str, name: str) -> np.ndarray:
        return np.array([by_label[label].cases[c].get(name, math.nan) for c in cases], float)

    others = [r.label for r in results if r.label != baseline]
    tests = []
    for structure in structures:
        base = column(baseline, f"dice_{structure}")
        p = [_wilcoxon(column(label, f"dice_{structure}"), base) for label in others]
        for label, raw, adjusted in zip(others, p, holm(p), strict=True):
            tests.append({"variant": label, "baseline": baseline, "structure": structure,
                          "metric": "dice", "n": int(np.sum(np.isfinite(
                              column(label, f"dice_{structure}")) & np.isfinite(base))),
                          "p_wilcoxon": raw, "p_holm": float(adjusted)})
    found = {(t["variant"], t["structure"]): t for t in tests}
    rows = []
    for r in results:
        for structure in structures:
            dice, hd95 = column(r.label, f"dice_{structure}"), column(r.label, f"hd95_{structure}")
            test = found.get((r.label, structure), {})
            rows.append({
                "variant": r.label, "structure": structure,
                "dice_mean": _nanstat(np.nanmean, dice), "dice_std": _nanstat(np.nanstd, dice),
                "hd95_mean": _nanstat(np.nanmean, hd95), "hd95_std": _nanstat(np.nanstd, hd95),
                "n": int(np.sum(np.isfinite(dice))),
                "p_wilcoxon": test.get("p_wilcoxon", math.nan),
                "p_holm": test.get("p_holm", math.nan),
                "parameters": r.parameters, "train_s": r.train_s,
            })
    per_case = np.stack(
        [np.nanmean(np.stack([column(r.label, f"dice_{s}") for s in structures]), axis=0)
         if structures else np.full(len(cases), np.nan) for r in results], axis=1
    )
    ranks = mean_ranks(per_case)
    n_ranked = int(np.sum(np.all(np.isfinite(per_case), axis=1)))
    return Comparison(
        key=key, baseline=baseline, labels=[r.label for r in results], structures=structures,
        cases=cases, rows=rows, tests=tests,
        ranks={r.label: float(v) for r, v in zip(results, ranks, strict=True)},
        critical_difference=critical_difference(len(results), n_ranked),
        variants=by_label,
    )


def _nanstat(function, values: np.ndarray) -> float:
    return float(function(values)) if np.any(np.isfinite(values)) else math.nan


# -- outputs -----------------------------------------------------------------------------


def write_comparison(comparison: Comparison, folder: str | Path) -> list[Path]:
    """Write the table (``table.csv``, ``table.json``, ``table.md``), the tests
    (``tests.json``), the Dice box plots (``dice_boxplot.png``) and the mean-rank plot
    (``mean_ranks.png``) to ``folder``, each through a temporary file.

    Returns
    -------
    paths : list of Path
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = list(comparison.rows[0]) if comparison.rows else ["variant", "structure"]

    def csv_table(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, header, lineterminator="\n")
            writer.writeheader()
            writer.writerows(comparison.rows)

    payload = {
        "key": comparison.key, "baseline": comparison.baseline, "cases": comparison.cases,
        "rows": comparison.rows, "tests": comparison.tests, "mean_ranks": comparison.ranks,
        "critical_difference": comparison.critical_difference,
    }
    written = {
        "table.csv": csv_table,
        # NaN as null: strict JSON readers reject NaN
        "table.json": lambda tmp: tmp.write_text(json.dumps(_nulls(payload), indent=2)),
        "table.md": lambda tmp: tmp.write_text(comparison.markdown()),
        "tests.json": lambda tmp: tmp.write_text(json.dumps(_nulls(comparison.tests), indent=2)),
        "dice_boxplot.png": lambda tmp: plot_dice_boxplots(comparison, tmp),
        "mean_ranks.png": lambda tmp: plot_mean_ranks(comparison, tmp),
    }
    paths = []
    for name, write in written.items():
        write_atomically(folder / name, write)
        paths.append(folder / name)
    return paths


def _nulls(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nulls(v) for v in value]
    return value


def plot_dice_boxplots(comparison: Comparison, path: str | Path) -> Path:
    """Box plots of per-case Dice: one panel per structure, one box per variant."""
    from matplotlib.figure import Figure

    n = max(len(comparison.structures), 1)
    fig = Figure(figsize=(1.2 + 1.1 * len(comparison.labels) * n, 3.4))
    for i, structure in enumerate(comparison.structures):
        ax = fig.add_subplot(1, n, i + 1)
        data = []
        for label in comparison.labels:
            cases = comparison.variants[label].cases
            values = np.array([cases[c].get(f"dice_{structure}", np.nan) for c in comparison.cases])
            data.append(values[np.isfinite(values)])
        ax.boxplot(data, tick_labels=comparison.labels)
        ax.set_title(f"Dice {structure}")
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return Path(path)


def plot_mean_ranks(comparison: Comparison, path: str | Path) -> Path:
    """Critical-difference style plot: each variant at its mean rank on a 1..k axis, with
    Nemenyi's critical difference drawn as a bar (variants closer than it do not differ)."""
    from matplotlib.figure import Figure

    k = len(comparison.labels)
    fig = Figure(figsize=(6, 1.2 + 0.35 * k))
    ax = fig.add_subplot(1, 1, 1)
    order = sorted(comparison.labels, key=lambda label: comparison.ranks[label])
    for row, label in enumerate(order):
        rank = comparison.ranks[label]
        ax.plot([rank], [row], "o", color="C0")
        ax.annotate(f"{label} ({rank:.2f})", (rank, row), xytext=(6, -4),
                    textcoords="offset points")
    cd = comparison.critical_difference
    if cd is not None:
        ax.plot([1, 1 + cd], [-0.8, -0.8], color="C3", linewidth=3)
        ax.annotate(f"CD = {cd:.2f}", (1, -0.8), xytext=(0, 5), textcoords="offset points")
    # best (rank 1) on the right, as in Demšar's diagrams; room for the CD bar
    ax.set_xlim(max(k, 1 + (cd or 0)) + 0.2, 0.8)
    ax.set_ylim(-1.3, k - 0.5)
    ax.set_yticks([])
    ax.set_xlabel("mean rank over cases (1 = best)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return Path(path)


# -- the study ---------------------------------------------------------------------------


def variant_result(label: str, cv: CrossValidationResult) -> VariantResult:
    """A finished cross-validation as the comparison takes it."""
    models = [r.model for r in cv.results if r.model is not None]
    train = [r.timings["train_s"] for r in cv.results if "train_s" in r.timings]
    return VariantResult(
        label=label,
        cases={c.case_id: dict(c.scores) for _, c in cv.cases},
        parameters=int(models[0].count_params()) if models else None,
        train_s=float(sum(train)) if train else None,
    )


class StudyObserver:
    """The seam between :func:`run_study` and whoever records it; records nothing."""

    def study_started(self, config: Config, key: str, variants: list[Variant],
                      baseline: str) -> None:
        """The study starts (before any variant)."""

    def finished_variant(self, variant: Variant) -> VariantResult | None:
        """A variant an earlier, interrupted study finished (None: run it)."""
        return None

    def variant_started(self, variant: Variant, index: int) -> Observer:
        """The observer of the variant's cross-validation."""
        return Observer()

    def variant_finished(self, variant: Variant, result: VariantResult,
                         observer: Observer) -> VariantResult:
        """The variant's cross-validation finished; returns its result (with its run id)."""
        return result

    def study_finished(self, comparison: Comparison) -> None:
        """The comparison of all variants."""

    def study_failed(self, error: BaseException) -> None:
        """The study raised ``error`` (re-raised after this)."""


def run_study(
    config: Config,
    spec: str | tuple[str, Sequence[Any]],
    baseline: str | None = None,
    observer: StudyObserver | None = None,
) -> tuple[Comparison, dict[str, CrossValidationResult]]:
    """Cross-validate every variant of ``spec`` on the same folds and compare them.

    Parameters
    ----------
    config : Config
        The study's config (``config.evaluation`` chooses the protocol).
    spec, baseline
        As in :func:`parse_variants` (checked before any data is read).
    observer : StudyObserver, optional
        Records the study; the variants it has a finished result for are not run again.

    Returns
    -------
    comparison : Comparison
    runs : dict of str to CrossValidationResult
        The cross-validations run by this call (not those read back), by label.
    """
    key, variants, baseline = parse_variants(config, spec, baseline)
    observer = observer or StudyObserver()
    observer.study_started(config, key, variants, baseline)
    runs: dict[str, CrossValidationResult] = {}
    try:
        results = []
        for index, variant in enumerate(variants):
            result = observer.finished_variant(variant)
            if result is None:
                child = observer.variant_started(variant, index)
                t0 = time.perf_counter()
                cv = run_cross_validation(variant.config, child)
                cv.timings.setdefault("total_s", time.perf_counter() - t0)
                runs[variant.label] = cv
                result = observer.variant_finished(
                    variant, variant_result(variant.label, cv), child
                )
            results.append(result)
        comparison = compare_variants(key, results, baseline)
    except BaseException as err:
        observer.study_failed(err)
        raise
    observer.study_finished(comparison)
    return comparison, runs
