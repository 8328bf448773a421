"""Small helpers for loading CLIP-family checkpoints, shared by the segmentation API and the training script."""

import contextlib

from transformers.image_processing_base import ImageProcessingMixin
from transformers.utils import logging as transformers_logging
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Where a DeCLIP release keeps its CLIP text tower and tokenizer (the vision model sits at the folder's root).
TEXT_ENCODER_SUBFOLDER = "text_encoder"


@contextlib.contextmanager
def quiet_transformers():
    """No loading reports or progress bars: loading one tower from a two-tower CLIP checkpoint lists every weight of
    the other one as unexpected, which is expected here."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def image_normalisation(
    name_or_path: str, default_mean=OPENAI_CLIP_MEAN, default_std=OPENAI_CLIP_STD, **hub_kwargs
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std of a checkpoint's image-processor config, or the defaults (CLIP's) when it has none."""
    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, **hub_kwargs)
    except OSError:
        return tuple(default_mean), tuple(default_std)
    return tuple(processor_dict.get("image_mean", default_mean)), tuple(processor_dict.get("image_std", default_std))
