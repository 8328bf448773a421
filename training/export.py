"""The distilled model folder (`RUN_DIR/model/`): weights with DeCLIP's weight-space ensembling (docs/method.md
§5), config with the mode, code and `auto_map` for `trust_remote_code`, an image processor (at the model's input size,
recording the training resolution) and, when the starting checkpoint had one, its text tower, so the folder alone
is enough for zero-shot segmentation.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPTextModelWithProjection, PretrainedConfig

from declip_hf import DeCLIPVisionModel
from declip_hf.models.loading_utils import TEXT_ENCODER_SUBFOLDER
from declip_hf.models.modeling_declip_eva import declip_vision_class
from declip_hf.models.preprocessing import TRAINING_SIZE_FIELD

PROCESSOR_NOTE = (
    "This processor resizes the shortest edge to {image_size} and centre-crops to the model's input size "
    "(config.image_size), for the ordinary forward, the image embedding and the image-feature-extraction pipeline. "
    "DeCLIP was distilled on {size}x{size} inputs (declip_training_size) made by resizing the longest side to {size} "
    "(bicubic), padding right/bottom with black and normalising with image_mean/image_std: for dense features use "
    "declip_hf.prepare_dense_inputs(images, size={size}, mean=image_mean, std=image_std), or any multiple of the "
    "patch size ({patch})."
)


@torch.no_grad()
def ensembled_state_dict(student: DeCLIPVisionModel, start_checkpoint: str, alpha: float) -> dict[str, torch.Tensor]:
    """`alpha * student + (1 - alpha) * starting weights` for every parameter and buffer (alpha = 1: the student).

    A copy: the live student keeps training. The starting weights are read again from `start_checkpoint` in
    float32 rather than taken from the teacher, which may run in half precision.
    """
    state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in student.state_dict().items()}
    if alpha == 1.0:
        return state
    start = declip_vision_class(start_checkpoint).from_pretrained(start_checkpoint, dtype=torch.float32).state_dict()
    # lerp(start, student, alpha) = start + alpha * (student - start): frozen tensors come back bit for bit.
    return {
        name: torch.lerp(start[name].float(), tensor.float(), alpha).to(tensor.dtype) if tensor.is_floating_point()
        else tensor
        for name, tensor in state.items()
    }


def image_processor_for(
    start_checkpoint: str, image_size: int, student_size: int, patch_size: int
) -> CLIPImageProcessor:
    """The starting checkpoint's CLIP processor (its mean, std, resampling) at the model's input size `image_size`,
    or CLIP's defaults at that size when the checkpoint has none; the training resolution `student_size` is
    recorded as `declip_training_size`.

    The processor must produce `image_size` inputs: transformers' image-feature-extraction pipeline (the card's
    pipeline tag, so the Hub widget) and `model(**processor(images))` feed its output to the ordinary forward,
    which refuses any other size."""
    try:
        processor = CLIPImageProcessor.from_pretrained(start_checkpoint)
    except OSError:
        processor = CLIPImageProcessor()
    processor.size = {"shortest_edge": image_size}
    processor.crop_size = {"height": image_size, "width": image_size}
    setattr(processor, TRAINING_SIZE_FIELD, student_size)
    processor.declip_note = PROCESSOR_NOTE.format(image_size=image_size, size=student_size, patch=patch_size)
    return processor


def text_encoder_subfolder(start_checkpoint: str) -> str | None:
    """Where the starting checkpoint keeps a CLIP text tower: `text_encoder/` of a DeCLIP folder (local or Hub),
    the root of a full CLIP checkpoint, or None."""
    for subfolder, text_model_types in ((TEXT_ENCODER_SUBFOLDER, ("clip_text_model", "clip")), ("", ("clip",))):
        try:
            config_dict, _ = PretrainedConfig.get_config_dict(start_checkpoint, subfolder=subfolder)
        except (OSError, ValueError):
            continue
        if config_dict.get("model_type") in text_model_types:
            return subfolder
    return None


def save_text_encoder(start_checkpoint: str, folder: Path) -> bool:
    """Copy the starting checkpoint's text tower and tokenizer into `folder`; False if it has none."""
    subfolder = text_encoder_subfolder(start_checkpoint)
    if subfolder is None:
        return False
    CLIPTextModelWithProjection.from_pretrained(start_checkpoint, subfolder=subfolder).save_pretrained(folder)
    AutoTokenizer.from_pretrained(start_checkpoint, subfolder=subfolder).save_pretrained(folder)
    return True


def save_model(
    student: DeCLIPVisionModel, folder: Path, start_checkpoint: str, alpha: float, student_size: int
) -> None:
    """Write the whole model folder (call on the main process only)."""
    folder = Path(folder)
    state = ensembled_state_dict(student, start_checkpoint, alpha)
    # declip_hf registers its classes for auto classes, so this also copies the code and writes `auto_map`.
    student.save_pretrained(folder, state_dict=state)
    config = student.config
    image_processor_for(start_checkpoint, config.image_size, student_size, config.patch_size).save_pretrained(folder)
    save_text_encoder(start_checkpoint, folder / TEXT_ENCODER_SUBFOLDER)
