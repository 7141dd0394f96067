"""This machine's conv3d throughput, forward + backward, in GFLOP/s.

The reference figure every timing in medseg's notes states: a 3×3×3 convolution of
16 → 16 channels on a batch of 2 × 32 × 64 × 64, its forward pass and both gradients
(input and kernel), timed after warm-up. FLOPs count 2 per multiply-add; the backward pass
costs twice the forward, so one step is 3 × the forward's FLOPs. Machines of one kind
differ ~9× here (0.44 s per step ≈ 25 GFLOP/s on an AVX2-only CPU).

    python benchmarks/conv_throughput.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medseg.planning.probe import measure_conv_throughput  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = measure_conv_throughput(repeats=args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"conv3d 16→16, 3×3×3, batch 2 × 32 × 64 × 64, forward + backward: "
        f"{result['seconds_per_step'] * 1000:.0f} ms per step (median of {args.repeats}), "
        f"{result['gflops']:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
