"""What prediction needs besides the model: the training run's ``plan.json``.

A saved model holds weights and layers only. Predicting new images with it also needs the
preprocessing it was trained with, the window (training patch) size, the network's stride
and the class names. Training writes them together as ``plan.json``: the
:class:`~medseg.pipeline.PreprocessPlan`'s keys (so ``PreprocessPlan.from_dict`` reads the
file as before) plus ``class_names``, ``patch_size``, ``stride`` and the ``postprocessing``
decided from the run's validation cases.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.pipeline.preprocess import PreprocessPlan

__all__ = ["PredictionPlan"]


@dataclass(frozen=True)
class PredictionPlan:
    """Preprocessing, window and classes of a trained model.

    Attributes
    ----------
    preprocess : PreprocessPlan
        Applied to every image before the sliding window, undone afterwards.
    class_names : tuple of str
        Output channel names, background first.
    patch_size : tuple of int
        Sliding-window size: the training patch size.
    stride : int, tuple of int or None
        The network's total down-sampling factor, one int or one per axis (full-image
        mode pads to a multiple of it); None pads small images to a whole patch instead.
    postprocessing : dict or None
        A :func:`~medseg.inference.postprocess.decide_postprocessing` decision applied to
        every predicted label map; None applies none.
    slab : int or None
        A 2D slab model's slice count (``patch.mode="slice"``: ``patch_size[0]``), or None
        for a 3D model.
    """

    preprocess: PreprocessPlan
    class_names: tuple[str, ...]
    patch_size: tuple[int, ...]
    stride: int | tuple[int, ...] | None = None
    postprocessing: dict[str, Any] | None = field(default=None, compare=False)
    slab: int | None = None

    @classmethod
    def from_config(
        cls,
        config,
        preprocess: PreprocessPlan,
        class_names: Sequence[str],
        stride=None,
        postprocessing: dict[str, Any] | None = None,
    ) -> PredictionPlan:
        """The plan of a model trained with ``config`` (a :class:`~medseg.config.Config`);
        ``stride`` (the experiment plan's) defaults to ``2**(model.depth - 1)``."""
        from medseg.models import stride as depth_stride

        if stride is None:
            stride = depth_stride(config.model.depth)
        return cls(
            preprocess=preprocess,
            class_names=tuple(class_names),
            patch_size=tuple(int(p) for p in config.patch.patch_size),
            stride=stride if isinstance(stride, int) else tuple(int(s) for s in stride),
            postprocessing=postprocessing,
            slab=int(config.patch.patch_size[0]) if config.patch.mode == "slice" else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.preprocess.to_dict(),
            "class_names": list(self.class_names),
            "patch_size": list(self.patch_size),
            "stride": self.stride if self.stride is None or isinstance(self.stride, int)
            else list(self.stride),
            **({"postprocessing": self.postprocessing} if self.postprocessing else {}),
            **({"slab": self.slab} if self.slab else {}),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "plan") -> PredictionPlan:
        """Read a plan; ``where`` (e.g. the file) names it in errors.

        Raises
        ------
        ValueError
            Naming ``where`` and the key that is missing or malformed.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
        missing = [k for k in ("class_names", "patch_size") if values.get(k) is None]
        if missing:
            raise ValueError(
                f"{where}: no {' or '.join(repr(k) for k in missing)}; a plan.json written by "
                "medseg training has them (older runs: pass a plan.json that adds them)"
            )
        try:
            preprocess = PreprocessPlan.from_dict(values)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not a preprocessing plan ({type(err).__name__}: {err})") from err
        names, patch, stride = values["class_names"], values["patch_size"], values.get("stride")
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: 'class_names' must list at least 2 names, got {names!r}")
        if (
            not isinstance(patch, list)
            or len(patch) != 3
            or not all(isinstance(p, int) and p > 0 for p in patch)
        ):
            raise ValueError(f"{where}: 'patch_size' must be 3 positive integers, got {patch!r}")
        if isinstance(stride, list) and len(stride) == 3 and all(
            isinstance(s, int) and s >= 1 for s in stride
        ):
            stride = tuple(stride)
        elif stride is not None and (not isinstance(stride, int) or stride < 1):
            raise ValueError(
                f"{where}: 'stride' must be a positive integer or 3 of them, got {stride!r}"
            )
        postprocessing = values.get("postprocessing")
        if postprocessing is not None:
            from medseg.inference.postprocess import check_postprocessing

            postprocessing = check_postprocessing(postprocessing, f"{where}: 'postprocessing'")
        slab = values.get("slab")
        if slab is not None and (not isinstance(slab, int) or slab < 1 or slab % 2 == 0):
            raise ValueError(f"{where}: 'slab' must be an odd positive integer, got {slab!r}")
        return cls(preprocess, tuple(names), tuple(patch), stride, postprocessing, slab)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PredictionPlan:
        from medseg.io.jsonfile import read_json

        return cls.from_dict(read_json(path, "plan file"), where=f"plan file {path}")

    def save(self, path: str | os.PathLike) -> Path:
        from medseg.io.jsonfile import write_json

        return write_json(path, self.to_dict())
