"""The distilled model folder (`RUN_DIR/model/`): weights with DeCLIP's weight-space ensembling (docs/method.md
§5), config with the mode, code and `auto_map` for `trust_remote_code`, an image processor and, when the
starting checkpoint had one, its text tower, so the folder alone is enough for zero-shot segmentation.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPTextModelWithProjection, PretrainedConfig

from declip_hf import DeCLIPVisionModel
from declip_hf.segmentation import TEXT_ENCODER_SUBFOLDER

PROCESSOR_NOTE = (
    "DeCLIP was distilled on {size}x{size} inputs made by resizing the longest side to {size} (bicubic) and padding "
    "right/bottom with black, normalised with image_mean/image_std. For dense features feed any size that is a "
    "multiple of the patch size ({patch}) the same way; this processor's shortest-edge resize and centre crop to "
    "{size} gives the same resolution for square images."
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
    start = DeCLIPVisionModel.from_pretrained(start_checkpoint, dtype=torch.float32).state_dict()
    # lerp(start, student, alpha) = start + alpha * (student - start): frozen tensors come back bit for bit.
    return {
        name: torch.lerp(start[name].float(), tensor.float(), alpha).to(tensor.dtype) if tensor.is_floating_point()
        else tensor
        for name, tensor in state.items()
    }


def image_processor_for(start_checkpoint: str, student_size: int, patch_size: int) -> CLIPImageProcessor:
    """The starting checkpoint's CLIP processor (its mean, std, resampling) set to the training resolution, or
    CLIP's defaults at that resolution when the checkpoint has none."""
    try:
        processor = CLIPImageProcessor.from_pretrained(start_checkpoint)
    except OSError:
        processor = CLIPImageProcessor()
    processor.size = {"shortest_edge": student_size}
    processor.crop_size = {"height": student_size, "width": student_size}
    processor.declip_note = PROCESSOR_NOTE.format(size=student_size, patch=patch_size)
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
    image_processor_for(start_checkpoint, student_size, student.config.patch_size).save_pretrained(folder)
    save_text_encoder(start_checkpoint, folder / TEXT_ENCODER_SUBFOLDER)
