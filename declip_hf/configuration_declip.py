"""Configuration of the DeCLIP vision model (DeCLIP, CVPR 2025, arXiv 2505.04410)."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig

# Decoupled modes (DeCLIP's content/context split) first, then the two baselines.
DECOUPLED_ATTENTION_MODES = ("qq", "kk", "vv", "csa", "all", "vanilla", "maskclip")
# The modes that have a context feature and can therefore be distilled.
TRAINABLE_ATTENTION_MODES = ("qq", "kk", "vv", "csa", "all")


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
        if name == "decoupled_attention" and value not in DECOUPLED_ATTENTION_MODES:
            raise ValueError(
                f"Unknown decoupled_attention {value!r}; valid values are {', '.join(DECOUPLED_ATTENTION_MODES)}."
            )
        super().__setattr__(name, value)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Read a DeCLIP config, or the vision part of a CLIP one, keeping CLIP's projection size."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return _as_declip_vision_dict(config_dict), kwargs


def _as_declip_vision_dict(config_dict: dict) -> dict:
    """A full `CLIPConfig` keeps `projection_dim` at its top level; the vision part alone may not carry it."""
    if "vision_config" in config_dict:
        vision_dict = dict(config_dict["vision_config"])
        if "projection_dim" in config_dict:
            vision_dict["projection_dim"] = config_dict["projection_dim"]
        config_dict = vision_dict
    # A CLIP vision tower is this architecture, so claim it rather than warn about a type mismatch.
    return {**config_dict, "model_type": DeCLIPVisionConfig.model_type}
