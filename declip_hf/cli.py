"""Command-line options shared by `python -m declip_hf.segment` and `python -m declip_hf.evaluate`."""

import argparse

import torch

from .configuration_declip import DECOUPLED_ATTENTION_MODES
from .segmentation import DeCLIPSegmenter


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """`--model` (required unless `default_model` is given), `--text-model`, `--decoupled-attention`, `--device`
    and `--windows-per-batch`: what `load_segmenter` and the segmenter's forward read."""
    model_help = "DeCLIP or CLIP checkpoint: local folder or Hub id."
    if default_model is None:
        parser.add_argument("--model", required=True, help=model_help)
    else:
        parser.add_argument("--model", default=default_model, help=model_help)
    parser.add_argument("--text-model", default=None, help="Checkpoint with the CLIP text tower, if --model has none.")
    parser.add_argument("--decoupled-attention", default=None, choices=DECOUPLED_ATTENTION_MODES,
                        help="Override the checkpoint's decoupled_attention.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--windows-per-batch", type=int, default=16, help="Sliding-window crops per forward pass.")


def load_segmenter(args: argparse.Namespace) -> DeCLIPSegmenter:
    """The segmenter the options of `add_model_arguments` describe, on `args.device`."""
    overrides = {"decoupled_attention": args.decoupled_attention} if args.decoupled_attention else {}
    return DeCLIPSegmenter.from_pretrained(args.model, text_model=args.text_model, **overrides).to(args.device)
