"""DeCLIP vision model: CLIP's vision tower with DeCLIP's decoupled final layer (CVPR 2025, arXiv 2505.04410).

All encoder layers but the last run unchanged. For dense prediction the last layer is read in a decoupled way:
its attention output, without residual or MLP, is the *content* feature (projected into CLIP's joint space), and
one or more of its raw q/k/v projections are the *context* feature. The ordinary `forward` stays plain CLIP.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_declip import DeCLIPCheckpointError, DeCLIPVisionConfig
from .region_pooling import check_boxes, check_masks, pool_boxes, pool_masks


@dataclass
class DeCLIPDenseOutput(ModelOutput):
    r"""
    dense_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim, height // patch, width // patch)`):
        Content features of every patch in CLIP's joint image-text space, L2-normalised over `projection_dim`.
    context_features (`tuple(torch.FloatTensor)`, each of shape `(batch_size, num_patches, hidden_size)`):
        The raw projections the context loss is applied to, patch rows in row-major order: `(q,)`, `(k,)` or `(v,)`
        for the single modes, `(q, k)` for `csa`, `(q, k, v)` for `all`, and empty for the baselines.
    """

    dense_embeds: torch.FloatTensor | None = None
    context_features: tuple[torch.FloatTensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------------------
# The final layer's decoupled paths. Each maps (last CLIP layer, its input x of shape (B, 1+N, C)) to
# (content tokens (B, 1+N, C), context features: a tuple of (B, 1+N, C)).
# --------------------------------------------------------------------------------------------------------------------


def _split_heads(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch_size, num_tokens, hidden_size = tensor.shape
    # (B, T, C) -> (B, H, T, d)
    return tensor.view(batch_size, num_tokens, num_heads, hidden_size // num_heads).transpose(1, 2)


def _merge_heads(tensor: torch.Tensor) -> torch.Tensor:
    batch_size, num_heads, num_tokens, head_dim = tensor.shape
    # (B, H, T, d) -> (B, T, C)
    return tensor.transpose(1, 2).reshape(batch_size, num_tokens, num_heads * head_dim)


def tokens_to_map(tokens: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """(B, N, D) patch tokens in row-major order -> (B, D, h, w) feature map."""
    batch_size, _, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch_size, channels, grid_height, grid_width)


def _fused_self_similarity(similarity: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(similarity, similarity, values, scale=scale)


def _eager_self_similarity(similarity: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    weights = torch.softmax(similarity @ similarity.transpose(-1, -2) * scale, dim=-1, dtype=torch.float32)
    return weights.to(values.dtype) @ values


class SelfSimilarityAttention:
    """Attention whose weights compare a projection with itself: DeCLIP's content path.

    Each group of projections contributes `softmax(s / len(group) * sum_p p p^T) @ v`. Concatenating the group's
    projections along the head dimension turns that sum into one dot product, so every mode, `all` included,
    runs through fused `scaled_dot_product_attention`. A model loaded with `attn_implementation="eager"` gets the
    same formula written out (for comparison and benchmarking).
    """

    def __init__(self, *similarity_groups: tuple[str, ...]):
        self.similarity_groups = similarity_groups
        # Context features are the projections the weights are built from, each once, in q, k, v order.
        used = {name for group in similarity_groups for name in group}
        self.context_names = tuple(name for name in ("q", "k", "v") if name in used)
        # v is always attended over; the other projections are computed only where a group reads them.
        self.projection_names = tuple(name for name in ("q", "k", "v") if name in used | {"v"})

    def __call__(self, layer: CLIPEncoderLayer, hidden_states: torch.Tensor):
        attention = layer.self_attn
        attend = _eager_self_similarity if attention.config._attn_implementation == "eager" else _fused_self_similarity
        normed = layer.layer_norm1(hidden_states)
        projections = {name: getattr(attention, f"{name}_proj")(normed) for name in self.projection_names}
        heads = {name: _split_heads(tensor, attention.num_heads) for name, tensor in projections.items()}
        attended = 0
        for group in self.similarity_groups:
            similarity = torch.cat([heads[name] for name in group], dim=-1)  # (B, H, T, d * len(group))
            attended = attended + attend(similarity, heads["v"], attention.scale / len(group))
        content_tokens = attention.out_proj(_merge_heads(attended))
        return content_tokens, tuple(projections[name] for name in self.context_names)


def vanilla_path(layer: CLIPEncoderLayer, hidden_states: torch.Tensor):
    """Baseline: CLIP's own last layer (q-k attention, residuals, MLP)."""
    return layer(hidden_states, None), ()


def maskclip_path(layer: CLIPEncoderLayer, hidden_states: torch.Tensor):
    """Baseline (MaskCLIP): attention replaced by the value path, residuals and MLP kept."""
    attention = layer.self_attn
    hidden_states = hidden_states + attention.out_proj(attention.v_proj(layer.layer_norm1(hidden_states)))
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states)), ()


DECOUPLED_PATHS = {
    "qq": SelfSimilarityAttention(("q",)),
    "kk": SelfSimilarityAttention(("k",)),
    "vv": SelfSimilarityAttention(("v",)),
    "csa": SelfSimilarityAttention(("q",), ("k",)),
    "all": SelfSimilarityAttention(("q", "k", "v")),
    "vanilla": vanilla_path,
    "maskclip": maskclip_path,
}


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint layout. On disk we keep the Hub's CLIP layout (`vision_model.<tower>` + `visual_projection`), which is
# what `openai/clip-*` checkpoints hold and what `CLIPVisionModel(WithProjection)` read. In memory the tower sits
# at the root, as in transformers 5's `CLIPVisionModel`.
# --------------------------------------------------------------------------------------------------------------------


class _VisionTowerPrefix(WeightRenaming):
    """Strip `vision_model.` when loading; add it back on saving to everything but the projection.

    Not a `PrefixChange`: transformers drops those when saving a model built from scratch, and we want one
    on-disk layout however the model was made.
    """

    def __init__(self, source_patterns=r"^vision_model\.(.+)", target_patterns=r"\1"):
        super().__init__(source_patterns=source_patterns, target_patterns=target_patterns)

    def reverse_transform(self) -> WeightRenaming:
        renaming = WeightRenaming(
            source_patterns=r"^(?:(?!vision_model\.|visual_projection\.))(.+)", target_patterns=r"vision_model.\1"
        )
        renaming.scope_prefix, renaming.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return renaming


# transformers skips the conversion mappings of custom classes unless they are registered under the class name:
# without this an unregistered subclass silently loads no weights from a Hub CLIP checkpoint.
register_checkpoint_conversion_mapping("DeCLIPVisionModel", [_VisionTowerPrefix()], overwrite=True)


class DenseFeaturesMixin:
    """The dense API shared by every DeCLIP vision model (OpenAI CLIP and EVA02-CLIP students): input checks,
    region and mask pooling, and `from_pretrained` refusing checkpoints with missing weights.

    A model using it provides `config` (with `num_channels`), `patch_size`, `get_dense_features`, `_map_to_pool`
    (the dense map region and mask pooling read: the normalised one for OpenAI CLIP, docs/method.md §2, the raw one
    for EVA02, §8) and `_missing_weights_message`.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """[`PreTrainedModel.from_pretrained`], refusing checkpoints that lack vision weights.

        transformers initialises missing weights randomly and only logs it; for DeCLIP that is a silently random
        model (an empty safetensors file, a `CLIPVisionModel` checkpoint without the visual projection). A config
        of another architecture (DINOv2, ViT, ...) is refused before any weight is read. Both raise
        [`DeCLIPCheckpointError`] (a `ValueError`).
        """
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if loading_info["missing_keys"]:
            raise DeCLIPCheckpointError(cls._missing_weights_message(pretrained_model_name_or_path, loading_info))
        return (model, loading_info) if wants_loading_info else model

    def get_region_features(self, pixel_values: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One (K_i, D) tensor of L2-normalised RoIAlign features per image.

        `boxes` holds one (K_i, 4) tensor per image, xyxy normalised to [0, 1] in the input frame, x1 < x2 and
        y1 < y2 (see [`pool_boxes`], which raises a `ValueError` naming any other box). Pooled in float32, returned
        in the dense features' dtype (bf16 for a bf16 model)."""
        batch_size, _, _ = self._check_pixel_values(pixel_values)
        check_boxes(boxes, batch_size)  # before the forward pass, which a bad box would waste
        region_embeds = pool_boxes(self._map_to_pool(pixel_values), boxes)
        return region_embeds.split([len(image_boxes) for image_boxes in boxes])

    def get_mask_features(self, pixel_values: torch.Tensor, masks: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One (K_i, D) tensor of L2-normalised mask-pooled features per image.

        `masks` holds one (K_i, H', W') tensor per image (bool, 0/1 or soft non-negative weights), each mask selecting
        at least one pixel. The masks cover the same frame as `pixel_values` at any resolution (the input's, the
        patch grid's, the original image's when it was only resized): a mask whose aspect ratio differs from the
        input's raises a `ValueError`, since stretching a mask of another frame would pool the wrong patches. Pooled
        in float32, returned in the dense features' dtype (bf16 for a bf16 model)."""
        image_size = self._check_pixel_values(pixel_values)
        check_masks(masks, batch_size=image_size[0])
        self._check_mask_sizes(masks, image_size)
        mask_embeds = pool_masks(self._map_to_pool(pixel_values), masks)
        return mask_embeds.split([len(image_masks) for image_masks in masks])

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> tuple[int, int, int]:
        """(batch_size, height, width) of a valid (B, num_channels, H, W) float batch; errors that name the fix."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a (B, C, H, W) torch.Tensor, got {type(pixel_values).__name__}.")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values has dtype {pixel_values.dtype}; the model expects float pixels normalised by its image "
                "processor (AutoImageProcessor.from_pretrained(<model>)(images, return_tensors='pt').pixel_values), "
                "not raw 0-255 values."
            )
        num_channels = self.config.num_channels
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected a batch (B, {num_channels}, H, W). One "
                f"({num_channels}, H, W) image is pixel_values[None]; an (H, W) array is not an image the model reads: "
                "convert it with the image processor, which also normalises it."
            )
        batch_size, channels, height, width = pixel_values.shape
        if channels != num_channels:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}: {channels} channels where the model has "
                f"{num_channels}; images are channels-first (B, C, H, W) (from (B, H, W, C) use .permute(0, 3, 1, 2))."
            )
        if batch_size == 0:
            raise ValueError(f"pixel_values is an empty batch ({tuple(pixel_values.shape)}); pass at least one image.")
        if height == 0 or width == 0:
            raise ValueError(f"pixel_values has a 0-size image (shape {tuple(pixel_values.shape)}).")
        return batch_size, height, width

    @staticmethod
    def _check_mask_sizes(masks: list[torch.Tensor], image_size: tuple[int, int, int]):
        """Masks must cover the input's frame: its aspect ratio, at any resolution, within a pixel of rounding."""
        _, height, width = image_size
        for index, image_masks in enumerate(masks):  # already checked to be (K, H, W) tensors, one per image
            mask_height, mask_width = image_masks.shape[-2:]
            # Cross-multiplied, one pixel of the finer of the two resolutions.
            if abs(mask_height * width - mask_width * height) > max(width, mask_width):
                raise ValueError(
                    f"masks[{index}] are {mask_height}x{mask_width} but the input is {height}x{width}: masks must "
                    "cover the same frame as pixel_values (same aspect ratio, any resolution; they are area-resized "
                    "onto the patch grid). Resize, crop or pad them exactly as the image was."
                )

    def _grid_size(self, image_size: tuple[int, int, int]) -> tuple[int, int]:
        _, height, width = image_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Input size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"pad or resize the image to a multiple of {self.patch_size} on each side."
            )
        return height // self.patch_size, width // self.patch_size



class DeCLIPVisionModel(DenseFeaturesMixin, CLIPVisionModel):
    r"""
    CLIP's vision tower and visual projection, with DeCLIP's decoupled final layer for dense features.

    `forward` is exactly [`CLIPVisionModel`]'s. `get_dense_features`, `get_region_features` and `get_mask_features`
    read the last layer in the mode set by `config.decoupled_attention`. Loads DeCLIP checkpoints and any CLIP
    checkpoint (`CLIPModel` or `CLIPVisionModelWithProjection`); text weights are ignored.

    Example:

    ```python
    >>> model = DeCLIPVisionModel.from_pretrained("openai/clip-vit-base-patch16", decoupled_attention="qq")
    >>> dense = model.get_dense_features(pixel_values).dense_embeds  # (B, 512, H / 16, W / 16)
    ```
    """

    config: DeCLIPVisionConfig
    config_class = DeCLIPVisionConfig
    # A full CLIPModel checkpoint also holds the text tower; DeCLIP only needs the vision side.
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    def __init__(self, config: DeCLIPVisionConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def _init_weights(self, module):
        # Keyed on the projection itself, not on `self`: CLIPVisionModel.__init__ already ran post_init and marked the
        # root initialised before the projection existed, so a `module is self` branch would never run again.
        if module is getattr(self, "visual_projection", None):
            # CLIPVisionModelWithProjection's initialisation. transformers' `init` skips weights loaded from a checkpoint.
            init.normal_(module.weight, std=self.config.hidden_size**-0.5 * self.config.initializer_factor)
        else:
            super()._init_weights(module)

    @property
    def decoupled_path(self):
        """The last layer's dense path for `config.decoupled_attention` (read each time, so changing the config's
        mode on a loaded model takes effect)."""
        return DECOUPLED_PATHS[self.config.decoupled_attention]

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """CLIP's image embedding, as transformers 5's `CLIPModel.get_image_features` returns it: the ordinary
        forward's output whose `pooler_output` is the projected (B, projection_dim) embedding, unnormalised (the CLS
        path). `output_hidden_states`, `output_attentions` and `return_dict` work as in `forward`.

        Example:

        ```python
        >>> image_embeds = model.get_image_features(pixel_values).pooler_output  # (B, projection_dim)
        ```"""
        vision_outputs: BaseModelOutputWithPooling = self(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    def get_dense_features(self, pixel_values: torch.Tensor) -> DeCLIPDenseOutput:
        """Dense content features (B, D, h, w) and context features (B, N, C) for images of any size that is a
        multiple of the patch size (the position embedding is resized bicubically).

        `pixel_values` is a (B, num_channels, H, W) float batch normalised by the model's image processor; features
        come back in the model's dtype."""
        grid_height, grid_width = self._grid_size(self._check_pixel_values(pixel_values))
        hidden_states = self._encode_before_last_layer(pixel_values)
        content_tokens, context = self.decoupled_path(self.encoder.layers[-1], hidden_states)
        # Layer norm and projection act per token, so the CLS row can be dropped first.
        content = self.visual_projection(self.post_layernorm(content_tokens[:, 1:]))  # (B, N, D)
        return DeCLIPDenseOutput(
            dense_embeds=F.normalize(tokens_to_map(content, grid_height, grid_width), dim=1),
            context_features=tuple(feature[:, 1:].contiguous() for feature in context),
        )

    def _map_to_pool(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The authors' OpenAI-CLIP path normalises the dense map before RoIAlign / mask pooling (docs/method.md §2).
        return self.get_dense_features(pixel_values).dense_embeds

    @staticmethod
    def _missing_weights_message(source, loading_info: dict) -> str:
        return _missing_weights_message(source, loading_info)

    def _encode_before_last_layer(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden_states = self.pre_layrnorm(hidden_states)
        for layer in self.encoder.layers[:-1]:
            hidden_states = layer(hidden_states, None)
        return hidden_states


def _missing_weights_message(source, loading_info: dict) -> str:
    missing = sorted(loading_info["missing_keys"])
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    hint = (
        "A CLIPVisionModel checkpoint has no visual projection; use a CLIPModel or CLIPVisionModelWithProjection one."
        if missing == ["visual_projection.weight"]
        else "Pass a DeCLIP or CLIP checkpoint (CLIPModel or CLIPVisionModelWithProjection) whose weights file holds "
        "the vision tower (`vision_model.*`) and `visual_projection`."
    )
    return (
        f"{source} lacks {len(missing)} of the DeCLIP vision model's weights ({shown}); they would be random. {hint} "
        "(To start from random weights on purpose: DeCLIPVisionModel(DeCLIPVisionConfig.from_pretrained(path)).)"
    )
