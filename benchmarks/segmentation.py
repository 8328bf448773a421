"""Zero-shot segmentation speed: `DeCLIPSegmenter` images/s, split into model time and everything else.

The 8-benchmark settings (docs/method.md §6): a ViT-B/16 DeCLIP with random weights built from its config (nothing
is downloaded), 448 px short side, 336 / 112 sliding windows, logit scale 40, and 21 (VOC-sized images, 500 x 375)
or 150 (ADE20K-sized, 683 x 512) classes with random name embeddings (the text tower is not part of the per-image
cost: class embeddings are computed once per class list). "model" is the time inside
`vision_model.get_dense_features`; "rest" is everything else in the call: resizing, window bookkeeping, the
per-window cosine maps and their upsampling, upsampling every class's logits to the full resolution, softmax, the
max over names and the argmax. The settings run interleaved, `--repeats` rounds, and the median is reported.

    python benchmarks/segmentation.py                 # ViT-B/16, 2 images per setting (a few minutes on 2 cores)
    python benchmarks/segmentation.py --tiny          # the tiny model on small images, seconds: checks the script
    python benchmarks/segmentation.py --profile       # also the profiler's top operators outside the model
"""

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from declip_hf import DeCLIPVisionConfig, DeCLIPVisionModel
from declip_hf.segmentation.segmenter import ClassEmbeddings, DeCLIPSegmenter

VIT_B_16 = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
    patch_size=16, projection_dim=512, hidden_act="quick_gelu",
)
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=4, projection_dim=24)

# name -> (number of classes, image (height, width)); the protocol's inference settings are the same for both.
SETTINGS = {"voc21": (21, (375, 500)), "ade150": (150, (512, 683))}
PROTOCOL = dict(shorter_side=448, window=336, stride=112, logit_scale=40.0)
TINY_PROTOCOL = dict(shorter_side=48, window=32, stride=16, logit_scale=40.0)


def build_segmenter(config_kwargs: dict, seed: int) -> DeCLIPSegmenter:
    torch.manual_seed(seed)
    vision_model = DeCLIPVisionModel(DeCLIPVisionConfig(**config_kwargs, decoupled_attention="qq"))
    # No text side: the benchmark passes class embeddings, as `evaluate` does after encoding a class list once.
    return DeCLIPSegmenter(vision_model.eval(), nn.Identity(), None)


def random_classes(num_classes: int, dim: int, seed: int) -> ClassEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    return ClassEmbeddings(
        name_embeds=F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1),
        name_to_class=torch.arange(num_classes),
    )


@contextmanager
def model_clock(segmenter: DeCLIPSegmenter, seconds: list):
    """Time every `get_dense_features` call (appending to `seconds`) while inside the block."""
    model = segmenter.vision_model
    original = model.get_dense_features

    def timed(*args, **kwargs):
        start = time.perf_counter()
        output = original(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return output

    model.get_dense_features = timed
    try:
        yield
    finally:
        del model.get_dense_features  # back to the class's method


def run_once(segmenter, images, classes, protocol, return_probabilities: bool) -> tuple[float, float]:
    """(total seconds, model seconds) of one segmenter call."""
    model_seconds = []
    with model_clock(segmenter, model_seconds):
        start = time.perf_counter()
        segmenter(images, classes, return_probabilities=return_probabilities, **protocol)
        total = time.perf_counter() - start
    return total, sum(model_seconds)


def profile_rest(segmenter, images, classes, protocol, rows: int) -> str:
    """The profiler's top operators by self CPU time (the model's included: its matmuls head the list)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        segmenter(images, classes, **protocol)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="The tiny model and small images (a smoke test).")
    parser.add_argument("--images", type=int, default=2, help="Images per setting (one segmenter call).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds (settings interleaved); median reported.")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--probabilities", action="store_true", help="Also return the per-class probabilities.")
    parser.add_argument("--profile", action="store_true", help="Print the profiler's top operators per setting.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config_kwargs, protocol = (TINY, TINY_PROTOCOL) if args.tiny else (VIT_B_16, PROTOCOL)
    segmenter = build_segmenter(config_kwargs, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {}
    for name in args.settings:
        num_classes, (height, width) = SETTINGS[name]
        if args.tiny:
            height, width = height // 8, width // 8
        images = [torch.rand(3, height, width, generator=generator) for _ in range(args.images)]
        inputs[name] = (images, random_classes(num_classes, config_kwargs["projection_dim"], args.seed))
    for name, (images, classes) in inputs.items():  # warm-up
        run_once(segmenter, images[:1], classes, protocol, args.probabilities)
    timings = {name: [] for name in inputs}
    for _ in range(args.repeats):
        for name, (images, classes) in inputs.items():
            timings[name].append(run_once(segmenter, images, classes, protocol, args.probabilities))
    print(f"{'tiny' if args.tiny else 'ViT-B/16'} random weights, CPU, {torch.get_num_threads()} threads, "
          f"{args.images} images per call, {protocol}, median of {args.repeats} interleaved rounds; "
          f"torch {torch.__version__}")
    print("| setting | image | images/s | model s/image | rest s/image | rest / model | rest / model spread |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, runs in timings.items():
        num_classes, (height, width) = SETTINGS[name]
        total = statistics.median(run[0] for run in runs)
        model = statistics.median(run[1] for run in runs)
        shares = sorted((run[0] - run[1]) / run[1] for run in runs)
        image_shape = tuple(inputs[name][0][0].shape[-2:])
        print(f"| {name} ({num_classes} classes) | {image_shape[1]}x{image_shape[0]} | {args.images / total:.3f} | "
              f"{model / args.images:.3f} | {(total - model) / args.images:.3f} | {(total - model) / model:.3f} | "
              f"{shares[0]:.3f}-{shares[-1]:.3f} |")
    if args.profile:
        for name, (images, classes) in inputs.items():
            print(f"\n{name}:\n" + profile_rest(segmenter, images, classes, protocol, rows=15))


if __name__ == "__main__":
    main()
