"""Would fusing the frozen teachers' q/k/v projections into one GEMM speed up a step? (One of issue 13's ideas.)

Times three (T, C) x (C, C) projections against one (T, C) x (C, 3C) projection with the concatenated weights, at
the token counts of the recipe's frozen models (batch 2): the content teacher's 40 crops of 197 tokens and the
DINOv2-B view's 2 x 1226 tokens, in fp32 and bf16. The two alternate; medians over --rounds rounds, and the ratio
is the median of each round's ratio.

    python benchmarks/fused_qkv.py
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"teacher crops (40 x 197 tokens)": 40 * 197, "DINOv2-B view (2 x 1226 tokens)": 2 * 1226}


def seconds(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def compare(tokens: int, width: int, dtype: torch.dtype, rounds: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds of the separate and the fused projections, and the median of their per-round ratios."""
    inputs = torch.randn(tokens, width, dtype=dtype)
    weights = [torch.randn(width, width, dtype=dtype) for _ in range(3)]
    biases = [torch.randn(width, dtype=dtype) for _ in range(3)]
    fused_weight, fused_bias = torch.cat(weights), torch.cat(biases)
    separate = lambda: [F.linear(inputs, w, b) for w, b in zip(weights, biases)]  # noqa: E731
    fused = lambda: F.linear(inputs, fused_weight, fused_bias).chunk(3, dim=-1)  # noqa: E731
    times = [(seconds(separate, repeats), seconds(fused, repeats)) for _ in range(rounds)]
    return (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times),
            statistics.median(t[1] / t[0] for t in times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768, help="Hidden size (ViT-B: 768).")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds (median reported).")
    parser.add_argument("--repeats", type=int, default=10, help="Calls per round.")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, hidden size {args.width}, median of {args.rounds} alternating rounds\n")
    print("| tokens | dtype | 3 projections ms | 1 fused projection ms | fused / separate |")
    print("|---|---|---:|---:|---:|")
    for label, tokens in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            separate, fused, ratio = compare(tokens, args.width, dtype, args.rounds, args.repeats)
            print(f"| {label} | {str(dtype).removeprefix('torch.')} | {separate * 1e3:.1f} | {fused * 1e3:.1f} | "
                  f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
