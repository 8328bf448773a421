"""Tiny random checkpoints (CLIP with tokenizer, DINOv2, a DeCLIP EVA02 student) for tests, demos and the built-in training default.

They have the exact on-disk layout of the real Hub checkpoints (`openai/clip-vit-base-patch16`,
`facebook/dinov2-base`), only with hidden size 32 and two layers, so every loading path can be exercised offline.
"""

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PATCH_SIZE = 4
TINY_DINOV2_PATCH_SIZE = 2
_TINY_TOWER = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer with no merges: every byte is a token. Real enough to encode any text."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[])


def tiny_clip_config(projection_dim: int = 24) -> CLIPConfig:
    tokenizer_size = len(tiny_clip_tokenizer())
    text_config = {
        **_TINY_TOWER,
        "vocab_size": tokenizer_size,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer_size - 2,
        "eos_token_id": tokenizer_size - 1,
        "pad_token_id": tokenizer_size - 1,
        "projection_dim": projection_dim,
    }
    vision_config = {
        **_TINY_TOWER,
        "image_size": TINY_CLIP_IMAGE_SIZE,
        "patch_size": TINY_CLIP_PATCH_SIZE,
        "projection_dim": projection_dim,
    }
    # The Hub's CLIP configs repeat projection_dim in both towers; CLIP*ModelWithProjection reads it there.
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Write a random `CLIPModel` with tokenizer and image processor, laid out like a Hub CLIP checkpoint."""
    path = Path(path)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    size = {"shortest_edge": TINY_CLIP_IMAGE_SIZE}
    crop = {"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE}
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(path)
    return path


def save_tiny_eva(path: str | Path, seed: int = 0) -> Path:
    """Write a random DeCLIP EVA02 vision model (docs/method.md §8; hidden 32, 2 layers, 2 heads of 16, patch 4) as
    the converter writes one: weights, image processor, and the tiny CLIP's text tower with tokenizer in
    `text_encoder/` (projection 24 like the vision head), so it trains, segments and releases like a converted
    authors' checkpoint."""
    from .configuration_declip_eva import DeCLIPEvaVisionConfig
    from .modeling_declip_eva import DeCLIPEvaVisionModel
    from .loading_utils import TEXT_ENCODER_SUBFOLDER

    path = Path(path)
    torch.manual_seed(seed)
    config = DeCLIPEvaVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=85,
        image_size=TINY_CLIP_IMAGE_SIZE, patch_size=TINY_CLIP_PATCH_SIZE, projection_dim=24, decoupled_attention="csa",
    )
    DeCLIPEvaVisionModel(config).save_pretrained(path)
    size = {"shortest_edge": TINY_CLIP_IMAGE_SIZE}
    crop = {"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE}
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(path)
    CLIPTextModelWithProjection(tiny_clip_config().text_config).save_pretrained(path / TEXT_ENCODER_SUBFOLDER)
    tiny_clip_tokenizer().save_pretrained(path / TEXT_ENCODER_SUBFOLDER)
    return path


def save_tiny_dinov2(path: str | Path, num_register_tokens: int = 0, seed: int = 0) -> Path:
    """Write a random DINOv2 (with registers when `num_register_tokens` > 0) and its image processor."""
    path = Path(path)
    torch.manual_seed(seed)
    tower = {**_TINY_TOWER, "mlp_ratio": 2, "image_size": 32, "patch_size": TINY_DINOV2_PATCH_SIZE}
    if num_register_tokens:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tower, num_register_tokens=num_register_tokens))
    else:
        model = Dinov2Model(Dinov2Config(**tower))
    model.save_pretrained(path)
    # facebook/dinov2-* configs carry ImageNet statistics; BitImageProcessor's own defaults are CLIP's.
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    ).save_pretrained(path)
    return path
