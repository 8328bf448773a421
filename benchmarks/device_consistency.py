"""The tiny checkpoint's dense features and zero-shot segmentation on a device agree with the CPU.

The test suite pins the CPU; this runs the same public calls on `--device` (CUDA in `benchmarks/gpu_check.sh`) and
compares: dense features in fp32 within 1e-4, bf16 autocast features close in cosine, and the segmenter's label
maps and probabilities. Prints one line per check and exits 1 if any fails. With `--device cpu` it only exercises
the script (the gpu_check dry run).

    python benchmarks/device_consistency.py --device cuda
"""

import argparse
import sys
import tempfile

import torch
import torch.nn.functional as F

from declip_hf import DeCLIPVisionModel
from declip_hf.models.tiny import save_tiny_clip
from declip_hf.segmentation.segmenter import DeCLIPSegmenter


def dense_features(model, pixels, device: str, bf16: bool = False) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        return model.to(device).get_dense_features(pixels.to(device)).dense_embeds.float().cpu()


def checks(folder: str, device: str) -> dict[str, tuple[bool, str]]:
    model = DeCLIPVisionModel.from_pretrained(folder).eval()
    pixels = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    on_cpu, on_device = dense_features(model, pixels, "cpu"), dense_features(model, pixels, device)
    fp32_error = (on_cpu - on_device).abs().max().item()
    cosine = F.cosine_similarity(on_cpu, dense_features(model, pixels, device, bf16=True), dim=1).min().item()
    segmenter = DeCLIPSegmenter.from_pretrained(folder)
    images = [torch.rand(3, 45, 61, generator=torch.Generator().manual_seed(1))]
    settings = dict(shorter_side=48, window=32, stride=16, return_probabilities=True)
    classes = ["red", "green; grass", "blue", "sky"]
    cpu_output = segmenter(images, classes, **settings)
    device_output = segmenter.to(device)(images, classes, **settings)
    agreement = (cpu_output.label_maps[0] == device_output.label_maps[0]).float().mean().item()
    probability_error = (cpu_output.probabilities[0] - device_output.probabilities[0]).abs().max().item()
    return {
        "dense features fp32, max abs difference to CPU <= 1e-4": (fp32_error <= 1e-4, f"{fp32_error:.2e}"),
        "dense features bf16 autocast, min cosine to CPU fp32 >= 0.99": (cosine >= 0.99, f"{cosine:.4f}"),
        "segmentation label maps, share equal to CPU >= 0.99": (agreement >= 0.99, f"{agreement:.4f}"),
        "segmentation probabilities, max abs difference to CPU <= 1e-3": (probability_error <= 1e-3,
                                                                         f"{probability_error:.2e}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available; run with --device cpu to check the script only.")
    with tempfile.TemporaryDirectory() as folder:
        save_tiny_clip(folder)
        results = checks(folder, args.device)
    for name, (passed, value) in results.items():
        print(f"{'PASS' if passed else 'FAIL'} {name}: {value}")
    sys.exit(0 if all(passed for passed, _ in results.values()) else 1)


if __name__ == "__main__":
    main()
