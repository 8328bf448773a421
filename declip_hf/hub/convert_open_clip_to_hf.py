"""Convert OpenAI-architecture open_clip checkpoints (ViT-B/16, ViT-L/14, ViT-L/14-336) and the DeCLIP authors'
EVA02-CLIP checkpoints (`--arch EVA02-CLIP-B-16` / `EVA02-CLIP-L-14-336`, see `convert_eva_clip`) into DeCLIP folders.

DeCLIP's reference recipe (CVPR 2025, arXiv 2505.04410) trains with open_clip, so its checkpoints and the CLIPs
it starts from are open_clip state dicts. This maps such a state dict onto [`DeCLIPVisionModel`] (and, with
`--with-text`, onto `CLIPTextModelWithProjection`), then writes a folder that loads with `from_pretrained`:

    declip-convert CHECKPOINT.pt --arch ViT-B-16-quickgelu --out DIR \
        [--with-text [--tokenizer LOCAL_CLIP_TOKENIZER_DIR]] [--decoupled-attention qq]

With `--with-text` and no `--tokenizer`, the text tower gets OpenAI CLIP's BPE tokenizer, built from the vocabulary
file open_clip ships (every OpenAI-architecture open_clip model uses it); a tower with another vocabulary needs
`--tokenizer`.

The activation is not stored in the weights. OpenAI's CLIPs (and everything fine-tuned from them, e.g. DeCLIP's
OpenAI-based checkpoints) use QuickGELU; open_clip's plain `ViT-B-16` config builds nn.GELU. An architecture that
does not state `quick_gelu` (the `-quickgelu` names do) therefore needs `--hidden-act`.
"""

import argparse
import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ..models.configuration_declip import DECOUPLED_ATTENTION_MODES, DeCLIPVisionConfig
from ..models.loading_utils import TEXT_ENCODER_SUBFOLDER
from ..models.modeling_declip import DeCLIPVisionModel
from .convert_eva_clip import (
    EVA02_ARCHITECTURES,
    convert_eva_vision,
    eva_text_state_dict,
    VisionShape,
    is_eva02_architecture,
    num_layers,
    square_patch_grid,
)

# open_clip model configs (open_clip/model_configs/*.json) of the OpenAI-architecture ViTs, with their defaults
# (head_width 64, mlp_ratio 4) spelled out. `quick_gelu` is present only where the name states it.
_OPENAI_TEXT = {"context_length": 77, "vocab_size": 49408, "mlp_ratio": 4.0, "layers": 12}


def _open_clip_vit(
    embed_dim: int, image_size: int, layers: int, width: int, patch_size: int, text_width: int, text_heads: int
) -> dict:
    """An open_clip model config of an OpenAI-architecture ViT (12-layer text tower)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size},
        "text_cfg": {**_OPENAI_TEXT, "width": text_width, "heads": text_heads},
    }


_BASE_ARCHITECTURES = {
    "ViT-B-16": _open_clip_vit(512, 224, 12, 768, 16, text_width=512, text_heads=8),
    "ViT-B-32": _open_clip_vit(512, 224, 12, 768, 32, text_width=512, text_heads=8),
    "ViT-L-14": _open_clip_vit(768, 224, 24, 1024, 14, text_width=768, text_heads=12),
    "ViT-L-14-336": _open_clip_vit(768, 336, 24, 1024, 14, text_width=768, text_heads=12),
}
OPEN_CLIP_ARCHITECTURES = {
    **_BASE_ARCHITECTURES,
    **{f"{name}-quickgelu": {**config, "quick_gelu": True} for name, config in _BASE_ARCHITECTURES.items()},
}
HIDDEN_ACTS = {True: "quick_gelu", False: "gelu"}

# Key patterns of open_clip (and EVA-CLIP) towers this converter cannot map, with what they are.
_FOREIGN_ARCHITECTURES = (
    (r"^visual\.trunk\.", "a timm trunk (open_clip TimmModel: ConvNeXt, EVA02 via timm, ...)"),
    (
        r"^visual\.(blocks|patch_embed|pos_embed|cls_token)\b|(^|\.)rope(\.|$)",
        f"an EVA / EVA02-CLIP vision tower (the DeCLIP authors' EVA02 checkpoints convert with --arch "
        f"{' or '.join(EVA02_ARCHITECTURES)})",
    ),
    (r"^visual\.(layer1|attnpool|stem)\b", "a ModifiedResNet (OpenAI RN50-style) vision tower"),
    (r"^visual\.attn_pool", "an attentional pooler (CoCa)"),
    (r"\.ls_[12]\.", "LayerScale blocks"),
    (r"^visual\.head\b", "a timm-style head"),
)
_LAYER_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# OpenAI CLIP's byte-level BPE as open_clip ships it (open_clip/bpe_simple_vocab_16e6.txt.gz): its first line is a
# header, then merges; the vocabulary is 256 bytes, 256 end-of-word bytes, 48894 merges and the two specials.
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_NUM_MERGES = 49152 - 256 - 2
CLIP_BPE_VOCAB_SIZE = 49408

# Non-persistent in open_clip today, but older checkpoints (OpenAI's own) carry the causal mask; it is rebuilt.
_IGNORED_TEXT_KEYS = ("attn_mask",)


@dataclass(frozen=True)
class TextShape:
    width: int
    layers: int
    mlp_width: int
    context_length: int
    vocab_size: int
    embed_dim: int


@dataclass
class ConvertedCLIP:
    vision: DeCLIPVisionModel  # or DeCLIPEvaVisionModel: both save and load the same way
    text: CLIPTextModelWithProjection | None


# --------------------------------------------------------------------------------------------------------------------
# Reading and recognising the checkpoint
# --------------------------------------------------------------------------------------------------------------------


def load_open_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an open_clip checkpoint without unpickling code: a `.safetensors` file, or a `.pt`/`.bin` state dict,
    bare or under `state_dict` (open_clip's training checkpoints), with DDP's `module.` prefix or not."""
    path = Path(path)
    if path.suffix == ".safetensors":
        checkpoint = load_file(path)
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - re-raised with the likely cause
            raise ValueError(
                f"Could not read {path} as a weights-only state dict ({error}). OpenAI's original .pt files are "
                "TorchScript archives: load them once with open_clip (or torch.jit.load(...).state_dict()) and "
                "save the state dict with torch.save."
            ) from error
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"{path} holds no state dict: top-level keys are {sorted(checkpoint)[:10]}.")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def reject_foreign_architecture(state_dict: dict[str, torch.Tensor]) -> None:
    """Raise, naming what was found, unless the vision tower is open_clip's OpenAI-style ViT."""
    for pattern, description in _FOREIGN_ARCHITECTURES:
        found = [key for key in state_dict if re.search(pattern, key)]
        if found:
            raise ValueError(
                f"This checkpoint holds {description} (e.g. {found[0]!r}), not an OpenAI-architecture ViT. "
                f"Only open_clip's OpenAI-style ViTs convert: {', '.join(_BASE_ARCHITECTURES)}."
            )
    if (
        "visual.conv1.weight" not in state_dict
        or "visual.transformer.resblocks.0.attn.in_proj_weight" not in state_dict
    ):
        prefixes = sorted({".".join(key.split(".")[:2]) for key in state_dict})
        raise ValueError(
            "No OpenAI-style open_clip vision tower (expected visual.conv1.weight and "
            f"visual.transformer.resblocks.N.attn.in_proj_weight); found key prefixes {prefixes[:12]}."
        )


def infer_vision_shape(state_dict: dict[str, torch.Tensor]) -> VisionShape:
    """Read the tower's size from tensor shapes alone (meta tensors suffice)."""
    width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    grid = square_patch_grid(state_dict["visual.positional_embedding"].shape[0], "visual.positional_embedding")
    return VisionShape(
        width=width,
        layers=num_layers(state_dict, "visual.transformer.resblocks."),
        mlp_width=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        patch_size=patch_size,
        image_size=grid * patch_size,
        embed_dim=state_dict["visual.proj"].shape[1],
    )


def infer_text_shape(state_dict: dict[str, torch.Tensor]) -> TextShape:
    if "token_embedding.weight" not in state_dict or "text_projection" not in state_dict:
        text_keys = sorted(key for key in state_dict if not key.startswith("visual."))[:8]
        raise ValueError(
            "No OpenAI-style open_clip text tower (expected token_embedding.weight, transformer.resblocks.N, "
            f"text_projection); found {text_keys}. Convert without --with-text."
        )
    vocab_size, width = state_dict["token_embedding.weight"].shape
    return TextShape(
        width=width,
        layers=num_layers(state_dict, "transformer.resblocks."),
        mlp_width=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=vocab_size,
        embed_dim=state_dict["text_projection"].shape[1],
    )


# --------------------------------------------------------------------------------------------------------------------
# The architecture the user names, checked against the shapes
# --------------------------------------------------------------------------------------------------------------------


def resolve_architecture(arch: str) -> dict:
    """An open_clip model config: a name from `OPEN_CLIP_ARCHITECTURES` or the path of an open_clip JSON config."""
    if arch in OPEN_CLIP_ARCHITECTURES:
        return OPEN_CLIP_ARCHITECTURES[arch]
    if Path(arch).is_file():
        return json.loads(Path(arch).read_text())
    raise ValueError(
        f"Unknown architecture {arch!r}; use one of {', '.join([*OPEN_CLIP_ARCHITECTURES, *EVA02_ARCHITECTURES])} or "
        "the path of an open_clip model config JSON."
    )


def resolve_hidden_act(architecture: dict, hidden_act: str | None) -> str:
    """The activation is not in the state dict: take it from the flag, else from an explicit `quick_gelu`."""
    stated = HIDDEN_ACTS.get(architecture.get("quick_gelu"))
    if hidden_act is None and stated is None:
        raise ValueError(
            "The activation is not stored in the weights and this architecture does not state it. OpenAI CLIP "
            "weights and models fine-tuned from them (DeCLIP's OpenAI-based checkpoints included) use QuickGELU: "
            "pass --hidden-act quick_gelu (or a -quickgelu architecture). Models trained from scratch with open_clip's "
            "plain config use nn.GELU: pass --hidden-act gelu."
        )
    if hidden_act is not None and stated is not None and hidden_act != stated:
        raise ValueError(f"--hidden-act {hidden_act} contradicts the architecture, which states {stated}.")
    return hidden_act or stated


def expected_vision_shape(architecture: dict) -> VisionShape:
    vision = architecture["vision_cfg"]
    return VisionShape(
        width=vision["width"],
        layers=vision["layers"],
        mlp_width=int(vision["width"] * vision.get("mlp_ratio", 4.0)),
        patch_size=vision["patch_size"],
        image_size=vision["image_size"],
        embed_dim=architecture["embed_dim"],
    )


def expected_text_shape(architecture: dict) -> TextShape:
    text = architecture["text_cfg"]
    return TextShape(
        width=text["width"],
        layers=text["layers"],
        mlp_width=int(text["width"] * text.get("mlp_ratio", 4.0)),
        context_length=text.get("context_length", 77),
        vocab_size=text.get("vocab_size", 49408),
        embed_dim=architecture["embed_dim"],
    )


def check_shape(found: VisionShape | TextShape, expected: VisionShape | TextShape, tower: str) -> None:
    differences = [
        f"{field}: checkpoint {getattr(found, field)}, architecture {getattr(expected, field)}"
        for field in found.__dataclass_fields__
        if getattr(found, field) != getattr(expected, field)
    ]
    if differences:
        raise ValueError(f"The {tower} tower does not match the architecture: " + "; ".join(differences) + ".")


# --------------------------------------------------------------------------------------------------------------------
# Renaming
# --------------------------------------------------------------------------------------------------------------------


def _take(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return state_dict.pop(key).float()


def _convert_layers(state_dict: dict[str, torch.Tensor], source: str, target: str, layers: int) -> dict:
    """open_clip resblocks (fused nn.MultiheadAttention in_proj) -> CLIPEncoderLayers (separate q/k/v)."""
    converted = {}
    for index in range(layers):
        block, layer = f"{source}{index}.", f"{target}{index}."
        # nn.MultiheadAttention stacks the projections as [q; k; v] along the output dimension.
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", _take(state_dict, f"{block}attn.in_proj_{kind}").chunk(3)):
                converted[f"{layer}self_attn.{name}_proj.{kind}"] = part
        for old, new in _LAYER_RENAMES.items():
            for kind in ("weight", "bias"):
                converted[f"{layer}{new}.{kind}"] = _take(state_dict, f"{block}{old}.{kind}")
    return converted


def convert_vision_weights(state_dict: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Pops the `visual.*` tensors it maps from `state_dict`; names are DeCLIPVisionModel's in-memory ones."""
    return {
        "embeddings.patch_embedding.weight": _take(state_dict, "visual.conv1.weight"),
        "embeddings.class_embedding": _take(state_dict, "visual.class_embedding"),
        "embeddings.position_embedding.weight": _take(state_dict, "visual.positional_embedding"),
        "pre_layrnorm.weight": _take(state_dict, "visual.ln_pre.weight"),
        "pre_layrnorm.bias": _take(state_dict, "visual.ln_pre.bias"),
        **_convert_layers(state_dict, "visual.transformer.resblocks.", "encoder.layers.", layers),
        "post_layernorm.weight": _take(state_dict, "visual.ln_post.weight"),
        "post_layernorm.bias": _take(state_dict, "visual.ln_post.bias"),
        # open_clip multiplies x @ proj (C, D); nn.Linear stores (D, C).
        "visual_projection.weight": _take(state_dict, "visual.proj").T.contiguous(),
    }


def convert_text_weights(state_dict: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Pops the text tensors it maps; names are CLIPTextModelWithProjection's."""
    return {
        "text_model.embeddings.token_embedding.weight": _take(state_dict, "token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": _take(state_dict, "positional_embedding"),
        **_convert_layers(state_dict, "transformer.resblocks.", "text_model.encoder.layers.", layers),
        "text_model.final_layer_norm.weight": _take(state_dict, "ln_final.weight"),
        "text_model.final_layer_norm.bias": _take(state_dict, "ln_final.bias"),
        "text_projection.weight": _take(state_dict, "text_projection").T.contiguous(),
    }


def _refuse_leftovers(state_dict: dict[str, torch.Tensor], with_text: bool) -> None:
    leftovers = [key for key in state_dict if key.startswith("visual.")]
    if with_text:
        leftovers += [
            key for key in state_dict
            if not key.startswith("visual.") and key.removeprefix("text.") not in _IGNORED_TEXT_KEYS
        ]
    if leftovers:
        raise ValueError(
            f"The checkpoint has tensors an OpenAI-architecture CLIP does not: {leftovers[:8]}"
            f"{' ...' if len(leftovers) > 8 else ''}. It is a variant this converter does not map."
        )


# --------------------------------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------------------------------


def vision_config(
    shape: VisionShape, architecture: dict, hidden_act: str, decoupled_attention: str
) -> DeCLIPVisionConfig:
    return DeCLIPVisionConfig(
        hidden_size=shape.width,
        intermediate_size=shape.mlp_width,
        num_hidden_layers=shape.layers,
        # open_clip sizes heads by head_width (64 for every OpenAI ViT), not by a head count.
        num_attention_heads=shape.width // architecture["vision_cfg"].get("head_width", 64),
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.embed_dim,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,  # open_clip's LayerNorm default
        decoupled_attention=decoupled_attention,
    )


def text_config(
    shape: TextShape, architecture: dict, hidden_act: str, logit_scale: float, tokenizer=None
) -> CLIPTextConfig:
    # OpenAI's BPE puts <|startoftext|>, <|endoftext|> last; the EOT id must be the largest, as open_clip pools
    # at argmax(token id) and CLIP's text model at the first eos_token_id.
    bos_token_id = tokenizer.bos_token_id if tokenizer is not None else shape.vocab_size - 2
    eos_token_id = tokenizer.eos_token_id if tokenizer is not None else shape.vocab_size - 1
    return CLIPTextConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.width,
        intermediate_size=shape.mlp_width,
        num_hidden_layers=shape.layers,
        num_attention_heads=architecture["text_cfg"].get("heads", 8),
        max_position_embeddings=shape.context_length,
        projection_dim=shape.embed_dim,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        # CLIPTextModelWithProjection has no logit scale; it is kept in the config (log-space, like
        # CLIPModel.logit_scale) for whoever scores text against images. DeCLIP's protocol uses a fixed scale.
        logit_scale=logit_scale,
    )


def convert_open_clip_state_dict(
    state_dict: dict[str, torch.Tensor],
    architecture: dict,
    hidden_act: str | None = None,
    decoupled_attention: str = "qq",
    with_text: bool = False,
    tokenizer=None,
) -> ConvertedCLIP:
    """Check `state_dict` against `architecture` (an open_clip model config) and map it onto HF modules."""
    reject_foreign_architecture(state_dict)
    hidden_act = resolve_hidden_act(architecture, hidden_act)
    vision_shape = infer_vision_shape(state_dict)
    check_shape(vision_shape, expected_vision_shape(architecture), "vision")
    text_shape = infer_text_shape(state_dict) if with_text else None
    if text_shape is not None:
        check_shape(text_shape, expected_text_shape(architecture), "text")
        if tokenizer is not None and len(tokenizer) != text_shape.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens; the text tower expects {text_shape.vocab_size}."
            )

    remaining = dict(state_dict)
    vision = DeCLIPVisionModel(vision_config(vision_shape, architecture, hidden_act, decoupled_attention))
    vision.load_state_dict(convert_vision_weights(remaining, vision_shape.layers), strict=True)
    text = None
    if text_shape is not None:
        logit_scale = float(remaining.pop("logit_scale", torch.tensor(2.6592)))
        text = CLIPTextModelWithProjection(text_config(text_shape, architecture, hidden_act, logit_scale, tokenizer))
        text.load_state_dict(convert_text_weights(remaining, text_shape.layers), strict=True)
    _refuse_leftovers(remaining, with_text)
    return ConvertedCLIP(vision=vision.eval(), text=text.eval() if text is not None else None)


def convert_eva_state_dict(
    state_dict: dict[str, torch.Tensor],
    arch: str,
    decoupled_attention: str = "csa",
    with_text: bool = False,
    tokenizer=None,
) -> ConvertedCLIP:
    """The DeCLIP authors' EVA02-CLIP checkpoint (docs/method.md §8) as a [`DeCLIPEvaVisionModel`] and, with
    `with_text`, its text tower (OpenAI-style, plain GELU) as a `CLIPTextModelWithProjection`."""
    remaining = dict(state_dict)
    vision = convert_eva_vision(remaining, arch, decoupled_attention)
    text_state_dict = eva_text_state_dict(remaining)
    text = None
    if with_text:
        text_shape = infer_text_shape(text_state_dict)
        if tokenizer is not None and len(tokenizer) != text_shape.vocab_size:
            raise ValueError(f"The tokenizer has {len(tokenizer)} tokens; the text tower expects {text_shape.vocab_size}.")
        heads = text_shape.width // EVA02_ARCHITECTURES[arch]["text_head_width"]
        logit_scale = float(text_state_dict.pop("logit_scale", torch.tensor(2.6592)))
        config = text_config(text_shape, {"text_cfg": {"heads": heads}}, "gelu", logit_scale, tokenizer)
        text = CLIPTextModelWithProjection(config)
        text.load_state_dict(convert_text_weights(text_state_dict, text_shape.layers), strict=True)
        remaining.update({f"text.{key}": value for key, value in text_state_dict.items()})
    _refuse_leftovers(remaining, with_text)
    return ConvertedCLIP(vision=vision, text=text.eval() if text is not None else None)


def open_clip_bpe_path() -> Path | None:
    """open_clip's BPE vocabulary file, found without importing open_clip (which is optional here)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / OPEN_CLIP_BPE_FILE).is_file():
            return Path(folder) / OPEN_CLIP_BPE_FILE
    return None


def clip_bpe_tokenizer(bpe_path: str | Path, context_length: int = 77) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer from open_clip's BPE file, in transformers' CLIP layout: the vocabulary is built in
    open_clip's `SimpleTokenizer` order, so every token id is the one the text tower was trained with."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_BPE_NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [
        *byte_tokens,
        *[token + "</w>" for token in byte_tokens],
        *["".join(merge) for merge in merges],
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def default_tokenizer(text_shape: TextShape) -> CLIPTokenizer:
    """The tokenizer of a text tower converted without --tokenizer: OpenAI CLIP's BPE, or a ValueError that names
    --tokenizer when the tower's vocabulary is another or open_clip's vocabulary file is not installed."""
    if text_shape.vocab_size != CLIP_BPE_VOCAB_SIZE:
        raise ValueError(
            f"The text tower has {text_shape.vocab_size} tokens, not the {CLIP_BPE_VOCAB_SIZE} of OpenAI CLIP's BPE, "
            "so no standard tokenizer fits it: pass --tokenizer with a local folder of the tokenizer it was "
            "trained with."
        )
    bpe_path = open_clip_bpe_path()
    if bpe_path is None:
        raise ValueError(
            f"No --tokenizer given, and open_clip's BPE vocabulary ({OPEN_CLIP_BPE_FILE}) is not installed: "
            "pip install open_clip_torch, or pass --tokenizer with a local CLIP tokenizer folder (e.g. a copy of "
            "openai/clip-vit-base-patch16)."
        )
    return clip_bpe_tokenizer(bpe_path, text_shape.context_length)


def save_converted(converted: ConvertedCLIP, out: str | Path, tokenizer=None) -> Path:
    """Write the DeCLIP folder (weights, config with auto_map, model code, image processor), and `text_encoder/`
    with `tokenizer` when there is a text tower."""
    if converted.text is not None and tokenizer is None:
        raise ValueError(
            "A converted text tower needs its tokenizer (without one it cannot embed class names): pass one, e.g. "
            "default_tokenizer(infer_text_shape(state_dict)) for OpenAI CLIP's BPE."
        )
    out = Path(out)
    converted.vision.save_pretrained(out)
    image_size = converted.vision.config.image_size
    # CLIPImageProcessor's defaults are OpenAI CLIP's: bicubic resize, centre crop, OpenAI mean/std.
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out)
    if converted.text is not None:
        converted.text.save_pretrained(out / TEXT_ENCODER_SUBFOLDER)
        tokenizer.save_pretrained(out / TEXT_ENCODER_SUBFOLDER)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "checkpoint", help="open_clip checkpoint: .pt/.bin state dict (bare or under 'state_dict') or .safetensors."
    )
    parser.add_argument(
        "--arch",
        required=True,
        help=f"open_clip architecture: one of {', '.join(OPEN_CLIP_ARCHITECTURES)}, or an open_clip model config JSON; "
        f"or {', '.join(EVA02_ARCHITECTURES)} for the DeCLIP authors' EVA02-CLIP checkpoints (sizes read from the "
        "tensors; text tower with plain GELU).",
    )
    parser.add_argument("--out", required=True, help="Folder to write the DeCLIP checkpoint to.")
    parser.add_argument(
        "--with-text", action="store_true", help=f"Also convert the text tower into OUT/{TEXT_ENCODER_SUBFOLDER}."
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Local folder of the text tower's tokenizer, saved into "
        f"OUT/{TEXT_ENCODER_SUBFOLDER} with --with-text. When not given, OpenAI CLIP's BPE tokenizer is built from "
        f"open_clip's {OPEN_CLIP_BPE_FILE} (needs open_clip_torch, and a {CLIP_BPE_VOCAB_SIZE}-token text tower).",
    )
    parser.add_argument(
        "--hidden-act",
        choices=sorted(set(HIDDEN_ACTS.values())),
        default=None,
        help="Activation of the towers; required unless the architecture states it (the -quickgelu names do). "
        "OpenAI weights and their fine-tunes: quick_gelu.",
    )
    parser.add_argument(
        "--decoupled-attention",
        choices=DECOUPLED_ATTENTION_MODES,
        default=argparse.SUPPRESS,  # the default depends on the architecture
        help="DeCLIP mode stored in the config (default: qq); for the EVA02 architectures (default: csa), the mode "
        "of the authors' released checkpoints.",
    )
    return parser.parse_args(argv)


def _convert_openai(args, state_dict, tokenizer) -> tuple[ConvertedCLIP, object, str]:
    architecture = resolve_architecture(args.arch)
    if args.with_text and tokenizer is None:
        reject_foreign_architecture(state_dict)  # the clearer message first, for a checkpoint of another kind
        tokenizer = default_tokenizer(infer_text_shape(state_dict))
    decoupled_attention = getattr(args, "decoupled_attention", "qq")
    converted = convert_open_clip_state_dict(
        state_dict, architecture, args.hidden_act, decoupled_attention, args.with_text, tokenizer
    )
    return converted, tokenizer, f"{converted.vision.config.hidden_act}, decoupled_attention={decoupled_attention}"


def _convert_eva02(args, state_dict, tokenizer) -> tuple[ConvertedCLIP, object, str]:
    if args.hidden_act not in (None, "gelu"):
        raise ValueError(f"EVA02-CLIP's towers use plain GELU (SwiGLU in the vision MLP); drop --hidden-act {args.hidden_act}.")
    if args.with_text and tokenizer is None:
        tokenizer = default_tokenizer(infer_text_shape(eva_text_state_dict(dict(state_dict))))
    decoupled_attention = getattr(args, "decoupled_attention", "csa")
    converted = convert_eva_state_dict(state_dict, args.arch, decoupled_attention, args.with_text, tokenizer)
    return converted, tokenizer, f"EVA02, decoupled_attention={decoupled_attention}"


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.tokenizer is not None and not args.with_text:
        raise SystemExit("--tokenizer only applies with --with-text.")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer is not None else None
    convert = _convert_eva02 if is_eva02_architecture(args.arch) else _convert_openai
    try:
        if convert is _convert_openai:
            resolve_architecture(args.arch)  # an unknown name is refused before the checkpoint is read
        state_dict = load_open_clip_state_dict(args.checkpoint)
        converted, tokenizer, summary = convert(args, state_dict, tokenizer)
    except ValueError as error:
        raise SystemExit(f"Conversion failed: {error}") from error
    out = save_converted(converted, args.out, tokenizer)
    tokenizer_note = f", tokenizer from {args.tokenizer or OPEN_CLIP_BPE_FILE}" if args.with_text else ""
    print(f"Wrote {out} ({summary}{tokenizer_note})")
    return out


if __name__ == "__main__":
    main()
