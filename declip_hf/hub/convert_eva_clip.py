"""Convert the DeCLIP authors' EVA02-CLIP checkpoints (their released weights, docs/method.md §8) into DeCLIP folders.

Their `.pt` files hold `{"state_dict": ...}` of their EVA-CLIP (`module.` prefixes from DDP possible): the vision tower
under `visual.` in EVA-CLIP's own layout (`blocks.N.attn.q_proj` + `q_bias`, `inner_attn_ln`, `mlp.w1/w2/ffn_ln/w3`,
`norm`, `head`, and the rotary tables `rope.freqs_*` as buffers), and the text tower under `text.`, an OpenAI-style
CLIP text transformer with plain GELU. Used through `declip-convert CKPT --arch
EVA02-CLIP-B-16 --out DIR`; the sizes come from the tensors, so smaller checkpoints of the family convert too.
"""

import re
from dataclasses import dataclass

import torch

from ..models.configuration_declip_eva import DeCLIPEvaVisionConfig
from ..models.modeling_declip_eva import DeCLIPEvaVisionModel, rotary_tables

# The authors' open_clip configs (src/open_clip/eva_clip/model_configs/EVA02-CLIP-*.json): the family's fixed facts.
# Sizes are read from the tensors; these say how to interpret them.
EVA02_ARCHITECTURES = {
    "EVA02-CLIP-B-16": {"head_width": 64, "text_head_width": 64, "rope_reference_grid": 16},
    "EVA02-CLIP-L-14-336": {"head_width": 64, "text_head_width": 64, "rope_reference_grid": 16},
}
# The rotary tables are rebuilt from the grid (docs/method.md §8); the stored copies are only checked.
_ROPE_BUFFER = re.compile(r"^visual\.(?:blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
_TEXT_PREFIX = "text."


def square_patch_grid(num_positions: int, key: str) -> int:
    """The side of the square patch grid of a position table with `num_positions` rows (CLS first); shared by the
    OpenAI and EVA02 converters."""
    grid = round((num_positions - 1) ** 0.5)
    if grid * grid != num_positions - 1:
        raise ValueError(f"{key} has {num_positions} rows: not 1 + a square grid of patches.")
    return grid


@dataclass(frozen=True)
class VisionShape:
    """What the vision tensors of an open_clip state dict say about the tower (OpenAI or EVA02 layout)."""

    width: int
    layers: int
    mlp_width: int
    patch_size: int
    image_size: int
    embed_dim: int


def num_layers(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered layers `prefix<N>.` the state dict holds."""
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"{re.escape(prefix)}(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def is_eva02_architecture(arch: str) -> bool:
    return arch in EVA02_ARCHITECTURES


def infer_eva_vision_shape(state_dict: dict[str, torch.Tensor]) -> VisionShape:
    """The tower's sizes from tensor shapes alone; a ValueError naming what is missing for another layout."""
    required = ("visual.patch_embed.proj.weight", "visual.pos_embed", "visual.blocks.0.mlp.w1.weight", "visual.head.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        prefixes = sorted({".".join(key.split(".")[:2]) for key in state_dict})
        raise ValueError(
            f"No EVA02-CLIP vision tower in the authors' layout (missing {missing}); found key prefixes {prefixes[:12]}. "
            "EVA02 architectures read the DeCLIP authors' EVA-CLIP checkpoints; open_clip's own EVA02 (a timm trunk, "
            "visual.trunk.*) is a different layout."
        )
    width, _, patch_size, _ = state_dict["visual.patch_embed.proj.weight"].shape
    grid = square_patch_grid(state_dict["visual.pos_embed"].shape[1], "visual.pos_embed")
    return VisionShape(
        width=width,
        layers=num_layers(state_dict, "visual.blocks."),
        mlp_width=state_dict["visual.blocks.0.mlp.w1.weight"].shape[0],
        patch_size=patch_size,
        image_size=grid * patch_size,
        embed_dim=state_dict["visual.head.weight"].shape[0],
    )


def eva_vision_config(shape: VisionShape, arch: str, decoupled_attention: str) -> DeCLIPEvaVisionConfig:
    family = EVA02_ARCHITECTURES[arch]
    if shape.width % family["head_width"]:
        raise ValueError(f"Width {shape.width} is not a multiple of {arch}'s head width {family['head_width']}.")
    return DeCLIPEvaVisionConfig(
        hidden_size=shape.width,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.width // family["head_width"],
        intermediate_size=shape.mlp_width,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.embed_dim,
        rope_reference_grid=family["rope_reference_grid"],
        layer_norm_eps=1e-6,  # EVA-CLIP's norm_layer: LayerNorm(eps=1e-6)
        decoupled_attention=decoupled_attention,
    )


def _check_rope_buffers(state_dict: dict[str, torch.Tensor], config: DeCLIPEvaVisionConfig) -> None:
    """The stored rotary tables must be the ones the model rebuilds (else the positions were built differently)."""
    grid = config.image_size // config.patch_size
    head_dim = config.hidden_size // config.num_attention_heads
    expected = dict(zip(("cos", "sin"), rotary_tables(grid, grid, head_dim, config.rope_reference_grid, config.rope_theta)))
    for key, tensor in state_dict.items():
        match = _ROPE_BUFFER.match(key)
        if match and not torch.allclose(tensor.float().reshape(expected[match.group(1)].shape), expected[match.group(1)],
                                        atol=1e-3):
            raise ValueError(
                f"{key} differs from EVA02's rotary embedding for a {grid}x{grid} grid (positions arange(n) / n * "
                f"{config.rope_reference_grid}); this checkpoint's positions were built another way."
            )


def convert_eva_vision_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pops every `visual.*` tensor: the model's names are the authors' without `visual.`; rope buffers are dropped."""
    converted = {}
    for key in [key for key in state_dict if key.startswith("visual.")]:
        tensor = state_dict.pop(key)
        if not _ROPE_BUFFER.match(key):
            converted[key.removeprefix("visual.")] = tensor.float()
    return converted


def convert_eva_vision(
    state_dict: dict[str, torch.Tensor], arch: str, decoupled_attention: str
) -> DeCLIPEvaVisionModel:
    """The authors' EVA02 vision tower as a [`DeCLIPEvaVisionModel`]; pops the `visual.*` tensors from `state_dict`.
    Every model weight must come from the checkpoint and every checkpoint tensor must land (else a ValueError)."""
    config = eva_vision_config(infer_eva_vision_shape(state_dict), arch, decoupled_attention)
    _check_rope_buffers(state_dict, config)
    model = DeCLIPEvaVisionModel(config)
    weights = convert_eva_vision_weights(state_dict)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint's EVA02 vision tower does not match the architecture: missing {missing[:8]}, "
            f"unexpected {['visual.' + key for key in unexpected[:8]]} (layer scale, relative position bias and "
            "mean pooling are EVA variants the authors' EVA02 models do not use)."
        )
    model.load_state_dict(weights, strict=True)
    return model.eval()


def eva_text_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pops the `text.*` tensors (and `logit_scale`), returned in open_clip's OpenAI text layout (no prefix): the
    authors' EVA text tower is that transformer, whose `Attention` keeps nn.MultiheadAttention's tensor names."""
    text = {key.removeprefix(_TEXT_PREFIX): state_dict.pop(key) for key in [k for k in state_dict if k.startswith(_TEXT_PREFIX)]}
    if "logit_scale" in state_dict:
        text["logit_scale"] = state_dict.pop("logit_scale")
    return text
