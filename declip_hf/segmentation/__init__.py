"""Zero-shot open-vocabulary segmentation with DeCLIP (docs/method.md §6): the segmenter, its prompts, benchmark specs
and protocol presets, PAMR, the evaluation loop, and the `declip-segment`, `declip-evaluate` and `declip-demo`
commands with their shared flags."""

from .segmenter import ClassEmbeddings, DeCLIPSegmentationOutput, DeCLIPSegmenter

__all__ = ["ClassEmbeddings", "DeCLIPSegmentationOutput", "DeCLIPSegmenter"]
