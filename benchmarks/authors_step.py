"""The DeCLIP authors' training step on the shapes of `train_step.py`, for its "authors' code" row (one JSON line).

`train_step.py --authors_src DIR` runs this in its own process; DIR is the `src` folder of a checkout of the authors'
repository (github.com/xiaomoguhz/DeCLIP), whose code is imported from there and never copied here. Their code
also needs `einops` (`pip install einops`).

What runs is theirs: their `DeCLIP` loss object (`training/declip.py`, mode `qq_vfm_distill`) on their open_clip
ViT-B-16 with QuickGELU as the student, with their freeze list, and the same model frozen as the content teacher;
AdamW over their two parameter groups; their loop's order (zero_grad, losses, backward, step) in fp32, as their
CPU path has no autocast. Three things are substituted so that it runs offline and is measured like our rows:
- the VFM: their code loads DINOv2 through torch.hub (the network). It is transformers' `Dinov2Model` with eager
  attention (their hub model without xformers computes attention the same explicit way) behind the
  `get_intermediate_layers(x, reshape=True)` call their loss makes, in fp32 (their GPU runs cast it to fp16);
- their SigLIP module, which does not import under transformers 5, is an empty module (ViT-B/16 never uses it);
- their `DeCLIP.__call__` does the teacher and the VFM inside the loss, so those two calls are timed by wrapping
  them; the student part is the rest of the step.
"""

import argparse
import json
import sys
import types
from argparse import Namespace
from pathlib import Path

import torch
from torch import nn

from step_shapes import SHAPES, clock, make_batch, measure_steps


def import_authors_code(src: Path):
    """Their open_clip and their loss class, from their `src` folder (and the repository root, which their
    `training.utils` imports `src.segment_anything` from)."""
    if not (src / "open_clip" / "factory.py").is_file() or not (src / "training" / "declip.py").is_file():
        raise SystemExit(f"error: {src} is not the src folder of a DeCLIP checkout (no open_clip/factory.py and "
                         "training/declip.py there); clone github.com/xiaomoguhz/DeCLIP and pass its src folder.")
    sys.path[:0] = [str(src), str(src.parent)]
    sys.modules["open_clip.siglip"] = types.ModuleType("open_clip.siglip")  # see the module docstring
    import open_clip
    from training.declip import DeCLIP
    from training.utils import freeze_parameters

    return open_clip, DeCLIP, freeze_parameters


class HubStyleDinov2(nn.Module):
    """transformers' DINOv2 answering the torch.hub model's `get_intermediate_layers(x, reshape=True)`: the last
    block's final-normed patch tokens as (B, C, h, w)."""

    def __init__(self, model: nn.Module, patch_size: int):
        super().__init__()
        self.model, self.patch_size = model, patch_size

    def get_intermediate_layers(self, pixel_values: torch.Tensor, reshape: bool = False):
        tokens = self.model(pixel_values=pixel_values).last_hidden_state[:, 1:]  # CLS dropped
        batch_size, _, height, width = pixel_values.shape
        # (B, N, C) -> (B, C, h, w)
        return (tokens.transpose(1, 2).reshape(batch_size, -1, height // self.patch_size, width // self.patch_size),)


def build_clip(open_clip, shape_name: str) -> nn.Module:
    """Their ViT-B-16 with QuickGELU (the OpenAI weights' activation), random weights; a tiny CLIP of the same
    class for `--tiny`."""
    if shape_name == "vitb16":
        return open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    config = SHAPES["tiny"].student
    vision = dict(image_size=config["image_size"], layers=config["num_hidden_layers"], width=config["hidden_size"],
                  patch_size=config["patch_size"], head_width=config["hidden_size"] // config["num_attention_heads"])
    text = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=1)
    return open_clip.CLIP(config["projection_dim"], vision, text, quick_gelu=True)


class Timed:
    """Wraps a callable and adds its seconds to `self.seconds` (the teacher and VFM calls inside their loss)."""

    def __init__(self, function, device: str):
        self.function, self.device, self.seconds = function, device, 0.0

    def __call__(self, *args, **kwargs):
        start = clock(self.device)
        result = self.function(*args, **kwargs)
        self.seconds += clock(self.device) - start
        return result


def build(open_clip, DeCLIP, freeze_parameters, shape_name: str, device: str):
    from transformers import AutoModel, Dinov2Config

    torch.manual_seed(0)
    student = build_clip(open_clip, shape_name).to(device)
    teacher = build_clip(open_clip, shape_name).to(device)
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    args = Namespace(model="ViT-B-16", mode="qq_vfm_distill", use_vfm="dinov2-B", loss_context_weight=0.1,
                     loss_content_weight=1.0, distributed=False, precision="fp32", device=device)
    student = freeze_parameters(student, args)
    student.train()
    vfm_config = Dinov2Config(**SHAPES[shape_name].vfm)
    vfm_model = AutoModel.from_config(vfm_config, attn_implementation="eager").eval().requires_grad_(False)
    vfm = HubStyleDinov2(vfm_model, vfm_config.patch_size).to(device)
    # Their two AdamW groups (training/main.py): no weight decay on gains, biases and logit_scale.
    exclude = lambda name, p: p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name  # noqa: E731
    named = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.1}],
        lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    return student, teacher, vfm, optimizer, args, DeCLIP()


def authors_batch(batch: dict[str, torch.Tensor]):
    """Their loader's tuple: images, normalised boxes with a validity column, crops, the VFM view."""
    boxes = torch.cat([batch["boxes"], batch["crop_valid"].float()[..., None]], dim=-1)  # (B, K, 5)
    return batch["student"], boxes, batch["crops"], batch["vfm"]


def instrument(teacher: nn.Module, vfm: HubStyleDinov2, device: str) -> None:
    """Time the two calls their loss makes on the frozen models."""
    teacher.encode_image = Timed(teacher.encode_image, device)
    vfm.get_intermediate_layers = Timed(vfm.get_intermediate_layers, device)


def timed_step(batch, student, teacher, vfm, optimizer, run_args, method) -> dict[str, float]:
    """Their loop's order: zero_grad, the losses (teacher and VFM inside), backward, step."""
    teacher.encode_image.seconds = vfm.get_intermediate_layers.seconds = 0.0
    start = clock(run_args.device)
    optimizer.zero_grad()
    losses, _ = method(batch, student, teacher, vfm, run_args)
    sum(losses.values()).backward()
    optimizer.step()
    step_s = clock(run_args.device) - start
    teacher_s, vfm_s = teacher.encode_image.seconds, vfm.get_intermediate_layers.seconds
    return {"vfm_s": vfm_s, "teacher_s": teacher_s, "student_s": step_s - vfm_s - teacher_s, "step_s": step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors_src", type=Path, required=True, help="The src folder of a DeCLIP checkout.")
    parser.add_argument("--tiny", action="store_true", help="Tiny models (checks the script itself).")
    parser.add_argument("--steps", type=int, default=2, help="Measured steps (after one warm-up step).")
    parser.add_argument("--batch_size", type=int, default=2, help="Images per step.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where the step runs.")
    parser.add_argument("--profile", action="store_true", help="Profile one more step (operator shares).")
    args = parser.parse_args()
    shape_name = "tiny" if args.tiny else "vitb16"
    open_clip, DeCLIP, freeze_parameters = import_authors_code(args.authors_src.resolve())
    student, teacher, vfm, optimizer, run_args, method = build(open_clip, DeCLIP, freeze_parameters, shape_name,
                                                               args.device)
    instrument(teacher, vfm, args.device)
    batch = authors_batch({key: value.to(args.device)
                           for key, value in make_batch(SHAPES[shape_name], args.batch_size, vfm.patch_size).items()})
    measured = measure_steps(lambda: timed_step(batch, student, teacher, vfm, optimizer, run_args, method),
                             args.steps, args.batch_size, args.device, args.profile)
    print(json.dumps({"name": "authors' code, fp32", **measured}))


if __name__ == "__main__":
    main()
