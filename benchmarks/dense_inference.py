"""Dense-feature inference cost of DeCLIP's decoupled last layer against a plain CLIP forward (ViT-B/16 sizes).

Both models hold the same random ViT-B/16-shaped weights. `get_dense_features` runs eleven ordinary layers, then the
decoupled attention (no residual, no MLP) and post-LN + projection on every patch; the baseline is
`CLIPVisionModelWithProjection(pixel_values, interpolate_pos_encoding=True)`, i.e. twelve full layers and the
projection of the CLS token. A ratio below 1 means dense DeCLIP features cost less than an ordinary CLIP forward.
`--family eva02` does the same for an EVA02-CLIP-B/16 student (`DeCLIPEvaVisionModel`, its default config), against
its own ordinary forward (`get_image_features`: twelve full blocks, the CLS token through `norm` and `head`).

    python benchmarks/dense_inference.py --sizes 448 672 --repeats 10
    python benchmarks/dense_inference.py --family eva02 --mode csa --sizes 448
"""

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from declip_hf import (
    DECOUPLED_ATTENTION_MODES,
    DeCLIPEvaVisionConfig,
    DeCLIPEvaVisionModel,
    DeCLIPVisionConfig,
    DeCLIPVisionModel,
)

VIT_B_16 = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
    patch_size=16, projection_dim=512,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 672], help="Square input sizes in pixels (multiples of 16).")
    parser.add_argument("--family", default="clip", choices=tuple(FAMILIES), help="Student architecture: OpenAI "
                        "CLIP ViT-B/16 or EVA02-CLIP-B/16 (random weights of that shape).")
    parser.add_argument("--mode", default="qq", choices=DECOUPLED_ATTENTION_MODES, help="decoupled_attention of the DeCLIP model.")
    parser.add_argument("--batch-size", type=int, default=1, help="Images per forward.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed runs of each model per setting before timing.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed runs of each model per setting; the median is reported.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
    parser.add_argument("--no-bf16", action="store_true", help="Skip the bf16 autocast rows (fp32 only).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and inputs.")
    return parser.parse_args()


def build_clip(mode: str, seed: int) -> tuple[DeCLIPVisionModel, callable]:
    """A random DeCLIP model, and the forward of a plain CLIPVisionModelWithProjection holding the same weights."""
    torch.manual_seed(seed)
    declip = DeCLIPVisionModel(DeCLIPVisionConfig(**VIT_B_16, decoupled_attention=mode)).eval()
    plain = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_B_16)).eval()
    # In memory DeCLIP keeps the tower at its root, CLIPVisionModelWithProjection under `vision_model.`.
    state = {
        key if key.startswith("visual_projection.") else f"vision_model.{key}": value
        for key, value in declip.state_dict().items()
    }
    plain.load_state_dict(state)
    return declip, lambda pixel_values: plain(pixel_values, interpolate_pos_encoding=True)


def build_eva02(mode: str, seed: int) -> tuple[DeCLIPEvaVisionModel, callable]:
    """A random EVA02-CLIP-B/16 DeCLIP model (the config's defaults); its baseline is its own ordinary forward."""
    torch.manual_seed(seed)
    declip = DeCLIPEvaVisionModel(DeCLIPEvaVisionConfig(decoupled_attention=mode)).eval()
    return declip, declip.get_image_features


FAMILIES = {"clip": build_clip, "eva02": build_eva02}


def median_seconds(runs: dict, warmup: int, repeats: int) -> dict:
    """Median wall time of each callable. They alternate run by run, so load from other processes on a shared
    machine falls on both sides of the ratio alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    timings = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def measure(declip, plain_forward, size: int, args, precision: str) -> dict:
    pixel_values = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16 autocast" else nullcontext()
    runs = {
        "dense": lambda: declip.get_dense_features(pixel_values),
        "plain": lambda: plain_forward(pixel_values),
    }
    with torch.inference_mode(), autocast:
        return {"size": size, "precision": precision, **median_seconds(runs, args.warmup, args.repeats)}


def print_header(args) -> None:
    print(
        f"{args.family} ViT-B/16 random weights, CPU, batch {args.batch_size}, mode {args.mode}, "
        f"{torch.get_num_threads()} threads, "
        f"median of {args.repeats} after {args.warmup} warm-up runs; torch {torch.__version__}"
    )
    header = f"| {'size':>5} | {'precision':<13} | {'get_dense_features ms':>21} | {'plain forward ms':>16} | {'ratio':>5} |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|", flush=True)


def print_row(row: dict) -> None:
    print(
        f"| {row['size']:>5} | {row['precision']:<13} | {row['dense'] * 1e3:>21.1f} | "
        f"{row['plain'] * 1e3:>16.1f} | {row['dense'] / row['plain']:>5.2f} |",
        flush=True,  # rows appear as they are measured: a full run takes minutes on a laptop CPU
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    declip, plain_forward = FAMILIES[args.family](args.mode, args.seed)
    print_header(args)
    for precision in ["fp32"] + ([] if args.no_bf16 else ["bf16 autocast"]):
        for size in args.sizes:
            print_row(measure(declip, plain_forward, size, args, precision))


if __name__ == "__main__":
    main()
