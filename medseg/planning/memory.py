"""The memory and compute model of a planned U-Net, from its topology alone.

nnU-Net decides patch and batch by summing the sizes of the network's convolution
feature maps for one sample (``compute_conv_feature_map_size``) and comparing the sum with
a reference calibrated to a GPU of 8 GB. :func:`conv_layers` lists the convolutions of a
planned plain or residual-encoder U-Net with their output sizes; from that list come the
feature-map elements (nnU-Net's number), the parameter count, the training FLOPs (for
the CPU time model) and a byte estimate (:func:`memory_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medseg.planning.rules import Topology

__all__ = [
    "ConvLayer",
    "MemoryReference",
    "REFERENCES",
    "conv_layers",
    "feature_map_elements",
    "memory_bytes",
    "parameter_count",
    "training_flops",
]


@dataclass(frozen=True)
class ConvLayer:
    """One convolution: output voxels per sample, kernel, channels."""

    voxels: int
    kernel: tuple[int, ...]
    c_in: int
    c_out: int


@dataclass(frozen=True)
class MemoryReference:
    """nnU-Net's calibration: feature-map elements that fill ``gigabytes`` at ``batch``."""

    elements: float
    gigabytes: float
    batch: int = 2
    max_dataset_share: float | None = 0.05  # the ResEnc presets drop the 5 % batch cap

    def budget_elements(self, gigabytes: float) -> float:
        """The reference scaled to a memory budget of ``gigabytes``."""
        return self.elements * gigabytes / self.gigabytes


# read from nnU-Net v2's planners (3D): plain U-Net 5.6e8 at 8 GB; ResEnc M 6.8e8 at 8 GB;
# ResEnc L 2.1e9 at 24 GB
REFERENCES = {
    "default": MemoryReference(5.6e8, 8.0),
    "resenc_m": MemoryReference(6.8e8, 8.0, max_dataset_share=None),
    "resenc_l": MemoryReference(2.1e9, 24.0, max_dataset_share=None),
}

# bytes per feature-map element and sample that make the reference come out at its GB
# with mixed precision (2-byte activations): the stored conv, norm and activation outputs
# and the gradients' working copies; float32 (CPU) doubles it
BYTES_PER_ELEMENT_FP16 = REFERENCES["default"].gigabytes * 1e9 / (
    REFERENCES["default"].elements * REFERENCES["default"].batch
)


def conv_layers(
    topology: Topology,
    widths: Sequence[int],
    patch: Sequence[int],
    in_channels: int,
    num_classes: int,
    encoder_blocks: Sequence[int] | None = None,
    decoder_convs: int = 2,
    convs_per_block: int = 2,
) -> list[ConvLayer]:
    """Every convolution of a planned U-Net for one sample of ``patch``.

    Parameters
    ----------
    topology : Topology
    widths : sequence of int
        Filters per stage.
    patch : sequence of int
    in_channels, num_classes : int
    encoder_blocks : sequence of int, optional
        Residual blocks per encoder stage (ResEnc); None: one block of ``convs_per_block``
        convolutions per stage (plain U-Net).
    decoder_convs : int
        Convolutions per decoder stage (plain 2, ResEnc 1).
    """
    layers: list[ConvLayer] = []
    size = [int(p) for p in patch]
    sizes = []
    c = in_channels
    for stage, (stride, kernel, width) in enumerate(
        zip(topology.strides, topology.kernels, widths, strict=True)
    ):
        size = [math.ceil(s / st) for s, st in zip(size, stride, strict=True)]
        sizes.append(list(size))
        voxels = math.prod(size)
        blocks = 1 if encoder_blocks is None else encoder_blocks[min(stage, len(encoder_blocks) - 1)]
        for block in range(blocks):
            for _ in range(convs_per_block):
                layers.append(ConvLayer(voxels, tuple(kernel), c, width))
                c = width
            if encoder_blocks is not None and (block == 0 and (stage > 0 or in_channels != width)):
                layers.append(ConvLayer(voxels, (1,) * len(kernel), c, width))  # projection
    for stage in reversed(range(topology.num_stages - 1)):
        width = widths[stage]
        voxels = math.prod(sizes[stage])
        # transposed convolution: kernel = stride
        layers.append(ConvLayer(voxels, tuple(topology.strides[stage + 1]), c, width))
        c = 2 * width  # concatenated skip
        for _ in range(decoder_convs):
            layers.append(ConvLayer(voxels, tuple(topology.kernels[stage]), c, width))
            c = width
    layers.append(ConvLayer(math.prod(sizes[0]), (1,) * len(patch), c, num_classes))
    return layers


def feature_map_elements(layers: Sequence[ConvLayer]) -> float:
    """nnU-Net's memory figure: the summed output elements of every convolution, one sample."""
    return float(sum(layer.voxels * layer.c_out for layer in layers))


def parameter_count(layers: Sequence[ConvLayer]) -> int:
    return int(sum(math.prod(layer.kernel) * layer.c_in * layer.c_out for layer in layers))


def training_flops(layers: Sequence[ConvLayer], batch: int) -> float:
    """Convolution FLOPs of one training step: forward (2 per multiply-add) + backward (2×)."""
    forward = sum(
        2.0 * layer.voxels * math.prod(layer.kernel) * layer.c_in * layer.c_out
        for layer in layers
    )
    return 3.0 * forward * batch


def memory_bytes(elements: float, batch: int, parameters: int, float32: bool) -> float:
    """Training memory: activations (calibrated on nnU-Net's reference) + weights,
    gradients and Adam's two moments (4 × float32 per parameter)."""
    per_element = BYTES_PER_ELEMENT_FP16 * (2.0 if float32 else 1.0)
    return elements * batch * per_element + 16.0 * parameters
