"""Configuration of the DeCLIP vision model (DeCLIP, CVPR 2025, arXiv 2505.04410)."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig

# Decoupled modes (DeCLIP's content/context split) first, then the two baselines.
DECOUPLED_ATTENTION_MODES = ("qq", "kk", "vv", "csa", "all", "vanilla", "maskclip")
# The modes that have a context feature and can therefore be distilled.
TRAINABLE_ATTENTION_MODES = ("qq", "kk", "vv", "csa", "all")


def check_decoupled_attention(mode) -> None:
    """Raise a ValueError naming the valid modes unless `mode` is one of `DECOUPLED_ATTENTION_MODES`."""
    if mode not in DECOUPLED_ATTENTION_MODES:
        raise ValueError(
            f"Unknown decoupled_attention {mode!r}; valid values are {', '.join(DECOUPLED_ATTENTION_MODES)}."
        )


@strict
class DeCLIPVisionConfig(CLIPVisionConfig):
    r"""
    Configuration of a [`DeCLIPVisionModel`]: a CLIP vision tower (every [`CLIPVisionConfig`] argument applies)
    whose final self-attention layer can be read in DeCLIP's decoupled way.

    Args:
        decoupled_attention (`str`, *optional*, defaults to `"qq"`):
            How `get_dense_features` computes the final layer. One of `"qq"`, `"kk"`, `"vv"` (attention weights
            `softmax(s x x^T)` from one projection), `"csa"` (the sum of the q-q and k-k weights), `"all"`
            (one softmax over `(qq^T + kk^T + vv^T) / 3`), or the baselines `"vanilla"` (CLIP's own last layer)
            and `"maskclip"` (the value path with residual and MLP). The ordinary `forward` is never affected.
        projection_dim (`int`, *optional*, defaults to 512):
            Size of CLIP's joint image-text space, i.e. of the visual projection the dense features go through.

    Example:

    ```python
    >>> from declip_hf import DeCLIPVisionConfig, DeCLIPVisionModel

    >>> config = DeCLIPVisionConfig(decoupled_attention="csa")
    >>> model = DeCLIPVisionModel(config)
    ```"""

    model_type = "declip_vision_model"

    decoupled_attention: str = "qq"

    def __setattr__(self, name, value):
        # Checked on every assignment rather than in a `validate_*` method: `@strict` wraps those errors in a
        # `StrictDataclassClassValidationError` (not a ValueError), and `from_pretrained(..., decoupled_attention=x)`
        # sets the attribute after construction, which no class validator sees.
        if name == "decoupled_attention":
            check_decoupled_attention(value)
        super().__setattr__(name, value)

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """Read a DeCLIP config, or the vision part of a CLIP one, keeping CLIP's projection size (every way of
        reading a `config.json` into this class, `from_pretrained` and `from_json_file`, goes through here)."""
        return _as_declip_vision_dict(super()._dict_from_json_file(json_file), source=json_file)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `AutoConfig` reads `config.json` with the base class and hands the raw dict to `from_dict`.
        return super().from_dict(_as_declip_vision_dict(config_dict), **kwargs)

    def to_diff_dict(self) -> dict:
        """What `save_pretrained` writes: DeCLIP's flat config plus `vision_config`, the same tower as a plain
        `clip_vision_model` config.

        `CLIPVisionConfig.from_pretrained` reads a config's `vision_config` (its `base_config_key`, the way it reads a
        full `CLIPConfig`), so `CLIPVisionModel(WithProjection).from_pretrained(declip_folder)` builds a plain CLIP
        config from it and raises no model-type mismatch warning. DeCLIP itself ignores the copy and reads the top
        level; the copy is rewritten from the top level on every save, so the two cannot drift apart.
        """
        config_dict = super().to_diff_dict()
        plain_clip = {key: value for key, value in config_dict.items() if key not in _DECLIP_ONLY_KEYS}
        return {**config_dict, _PLAIN_CLIP_KEY: {**plain_clip, "model_type": CLIPVisionConfig.model_type}}


class DeCLIPCheckpointError(ValueError):
    """A folder or Hub id cannot be loaded as a DeCLIP vision model: its config is not a CLIP vision tower, or its
    weights do not hold one. Raised by `DeCLIPVisionConfig.from_pretrained` and `DeCLIPVisionModel.from_pretrained`."""


# The config types that describe CLIP's vision tower, i.e. that DeCLIP can read.
CLIP_FAMILY_MODEL_TYPES = ("declip_vision_model", "clip_vision_model", "clip")
_PLAIN_CLIP_KEY = CLIPVisionConfig.base_config_key  # "vision_config"
# Keys of a saved DeCLIP config that a plain CLIPVisionConfig has no use for.
_DECLIP_ONLY_KEYS = {"decoupled_attention", "auto_map", "architectures", "model_type", _PLAIN_CLIP_KEY}


def _as_declip_vision_dict(config_dict: dict, source=None) -> dict:
    """The flat DeCLIP config dict for a DeCLIP, `clip_vision_model` or full `clip` config dict.

    A full `CLIPConfig` keeps `projection_dim` at its top level; the vision part alone may not carry it. A DeCLIP
    config's own `vision_config` is the plain-CLIP copy written for `CLIPVisionModel` (see `to_diff_dict`).
    """
    model_type = config_dict.get("model_type")
    # A dict without model_type declares nothing (transformers builds some from bare fields); one that declares
    # another model is a different architecture whose weights would not load.
    if model_type is not None and model_type not in CLIP_FAMILY_MODEL_TYPES:
        where = f" in {source}" if source is not None else ""
        raise DeCLIPCheckpointError(
            f"The config{where} declares model_type {model_type!r}, which is not a CLIP vision tower: DeCLIP loads "
            f"configs of model_type {', '.join(map(repr, CLIP_FAMILY_MODEL_TYPES))}. Pass a DeCLIP or CLIP "
            "checkpoint (e.g. openai/clip-vit-base-patch16); a DINOv2 model is a context teacher (distill's --vfm), "
            "not a DeCLIP model."
            + (" An EVA02 DeCLIP model loads with DeCLIPEvaVisionModel (or AutoModel)."
               if model_type == "declip_eva_vision_model" else "")
        )
    if model_type == "declip_vision_model":
        config_dict = {key: value for key, value in config_dict.items() if key != _PLAIN_CLIP_KEY}
    elif _PLAIN_CLIP_KEY in config_dict:
        vision_dict = dict(config_dict[_PLAIN_CLIP_KEY])
        if "projection_dim" in config_dict:
            vision_dict["projection_dim"] = config_dict["projection_dim"]
        config_dict = vision_dict
    # A CLIP vision tower is this architecture, so claim it rather than warn about a type mismatch.
    return {**config_dict, "model_type": DeCLIPVisionConfig.model_type}
