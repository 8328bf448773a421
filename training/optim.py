"""What DeCLIP trains and how (docs/method.md §5): the trainable set, AdamW groups and the warmup-cosine
schedule."""

import math

import torch
from torch import nn
from transformers import get_scheduler

from declip_hf import TRAINABLE_ATTENTION_MODES, DeCLIPEvaVisionConfig, DeCLIPVisionConfig, DeCLIPVisionModel


# Where each student class keeps its transformer layers, and the last layer's parts by role (a role may be several
# tensors: EVA02 keeps q's bias as a parameter beside `q_proj`, docs/method.md §8).
STUDENT_LAYOUTS = {
    DeCLIPVisionConfig.model_type: {
        "layers": lambda student: student.encoder.layers,
        "mlp": ["mlp", "layer_norm2"], "q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"],
    },
    DeCLIPEvaVisionConfig.model_type: {
        "layers": lambda student: student.blocks,
        "mlp": ["mlp", "norm2"], "q": ["attn.q_proj", "attn.q_bias"], "k": ["attn.k_proj"],
    },
}

# §5: the recipe's learning rate is given for a total batch of 16 images and scaled linearly with it.
REFERENCE_TOTAL_BATCH = 16

LR_SCALINGS = {
    "linear": lambda lr, total_batch: lr * total_batch / REFERENCE_TOTAL_BATCH,
    "none": lambda lr, total_batch: lr,
}


def scaled_learning_rate(lr: float, total_batch: int, scaling: str) -> float:
    if scaling not in LR_SCALINGS:
        raise ValueError(f"Unknown learning-rate scaling {scaling!r}; expected one of {sorted(LR_SCALINGS)}.")
    return LR_SCALINGS[scaling](lr, total_batch)


# The baselines' last layer (the ablations, docs/method.md §10): `vanilla` is CLIP's whole layer, so every part of
# it trains (both losses flow into it), as in the authors' `sanity_check` mode, whose freeze list for their EVA
# students holds only `logit_scale`; `maskclip` replaces attention by the value path, so q and k are never read.
BASELINE_UNUSED_MODULES = {"vanilla": [], "maskclip": ["q", "k"]}


def unused_last_layer_modules(student: DeCLIPVisionModel) -> list[str]:
    """Submodules of the last encoder layer that the dense path never reads.

    Distillation only runs `get_dense_features`, whose decoupled last layer is attention without residual or MLP: the
    MLP and `layer_norm2` get no gradient, and neither do the projections the mode's attention weights are not built
    from (k in `qq`, q in `kk`, q and k in `vv`; the value projection is always used). Left trainable they would make
    DDP fail ("parameters that were not used in producing loss") and AdamW would skip them anyway, so freezing them
    changes nothing in the result. The baselines: see `BASELINE_UNUSED_MODULES`.
    """
    mode, layout = student.config.decoupled_attention, STUDENT_LAYOUTS[student.config.model_type]
    if mode in BASELINE_UNUSED_MODULES:
        return [name for role in BASELINE_UNUSED_MODULES[mode] for name in layout[role]]
    if mode not in TRAINABLE_ATTENTION_MODES:
        raise ValueError(
            f"decoupled_attention={mode!r} cannot be distilled; expected one of "
            f"declip_hf.TRAINABLE_ATTENTION_MODES={TRAINABLE_ATTENTION_MODES} or a baseline "
            f"({', '.join(BASELINE_UNUSED_MODULES)}, through distill's --ablation)."
        )
    used = student.decoupled_path.projection_names
    return layout["mlp"] + [name for role in ("q", "k") if role not in used for name in layout[role]]


def _layer_part(layer: nn.Module, name: str):
    """A submodule, or a bare parameter (EVA02's `attn.q_bias`)."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return layer.get_parameter(name)


def configure_trainable(student: DeCLIPVisionModel, num_trainable_layers: int | None = None) -> list[str]:
    """Freeze everything but the last `num_trainable_layers` encoder layers (all when None) minus the last layer's
    unused parts; returns the names of the trainable parameters.

    Frozen per §5: patch/class/position embeddings, `pre_layrnorm`, `post_layernorm`, `visual_projection`.
    """
    layers = STUDENT_LAYOUTS[student.config.model_type]["layers"](student)
    num_trainable_layers = len(layers) if num_trainable_layers is None else num_trainable_layers
    if not 1 <= num_trainable_layers <= len(layers):
        raise ValueError(f"num_trainable_layers must be between 1 and {len(layers)}, got {num_trainable_layers}")
    student.requires_grad_(False)
    for layer in layers[len(layers) - num_trainable_layers :]:
        layer.requires_grad_(True)
    for name in unused_last_layer_modules(student):
        _layer_part(layers[-1], name).requires_grad_(False)
    return [name for name, parameter in student.named_parameters() if parameter.requires_grad]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: decay on matrices only, none on biases, norms and other 1-d."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


# Devices with torch's fused AdamW kernel: one kernel per step instead of `foreach` ops whose temporaries are as
# large as the trainable weights (hundreds of MB for ViT-B), so faster and with a lower peak memory.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    device_type: str = "cpu"):
    fused = device_type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, num_processes: int):
    """Linear warmup then cosine to 0, counted in optimizer updates.

    Accelerate's prepared scheduler steps the wrapped one `num_processes` times per update (it assumes the
    per-process batch and hence the epoch shrank with more processes; `split_batches=False`), so both lengths are
    given in those units here: the schedule then spans exactly `warmup_steps` and `total_steps` updates.
    """
    return get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def total_update_steps(
    max_steps: int | None, epochs: int, images_per_epoch: int | None, batch_per_update: int
) -> int:
    """Optimizer updates of the whole run: `max_steps`, or `epochs` passes over `images_per_epoch` images."""
    if max_steps is not None:
        return max_steps
    if images_per_epoch is None:
        raise ValueError(
            "The run length is unknown: give --max_steps, or --images_per_epoch when the dataset does not declare "
            "its size."
        )
    return epochs * math.ceil(images_per_epoch / batch_per_update)
