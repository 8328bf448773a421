"""Open-vocabulary semantic segmentation with DeCLIP's dense features (DeCLIP, CVPR 2025; docs/method.md §6).

Training-free: every patch's content feature is compared with text embeddings of the class names (the 80 OpenAI
ImageNet templates), over sliding windows, then softmax over the names; a class with several names takes the max
over them. Inference follows the SCLIP / mmseg `slide_inference` code the training-free literature reports with.
"""

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, PretrainedConfig
from transformers.utils import ModelOutput
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..models.loading_utils import TEXT_ENCODER_SUBFOLDER, image_normalisation, quiet_transformers
from ..models.modeling_declip import DeCLIPVisionModel
from ..models.modeling_declip_eva import declip_vision_class
from .prompts import OPENAI_IMAGENET_TEMPLATES

# Hub download options that also apply to the text tower, tokenizer and image-processor config.
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


@dataclass
class DeCLIPSegmentationOutput(ModelOutput):
    r"""
    label_maps (`list[torch.LongTensor]`, each of shape `(height, width)` of its input image):
        Class index per pixel; 0 where the background threshold applied.
    probabilities (`list[torch.FloatTensor]`, each of shape `(num_classes, height, width)`, *optional*):
        Per-class probability (softmax over all names, then the max over each class's names); returned when
        `return_probabilities=True`.
    """

    label_maps: list[torch.LongTensor] | None = None
    probabilities: list[torch.FloatTensor] | None = None


@dataclass
class ClassEmbeddings(ModelOutput):
    r"""
    name_embeds (`torch.FloatTensor` of shape `(num_names, projection_dim)`):
        L2-normalised text embedding of every class name (template ensemble).
    name_to_class (`torch.LongTensor` of shape `(num_names,)`):
        Class index of every name.
    """

    name_embeds: torch.FloatTensor | None = None
    name_to_class: torch.LongTensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.name_to_class.max()) + 1

    def check(self) -> None:
        """Raise a ValueError unless every name has an embedding, classes are numbered 0..C-1 with at least one
        name each (`max_over_names` relies on it), and the embeddings are finite."""
        if self.name_embeds.ndim != 2 or self.name_to_class.shape != (len(self.name_embeds),):
            raise ValueError(
                f"name_embeds {tuple(self.name_embeds.shape)} and name_to_class {tuple(self.name_to_class.shape)} "
                "must be (num_names, dim) and (num_names,)."
            )
        name_to_class = self.name_to_class.cpu()
        names_per_class = torch.bincount(name_to_class) if len(name_to_class) and name_to_class.min() >= 0 else None
        if names_per_class is None or (names_per_class == 0).any():
            raise ValueError(f"Every class 0..C-1 needs at least one name; got name_to_class {name_to_class.tolist()}.")
        require_finite(self.name_embeds, "The class-name embeddings")

    def max_over_names(self, name_scores: torch.Tensor, dim: int) -> torch.Tensor:
        """Per-class scores from per-name scores along `dim`: a class with several names scores their max."""
        num_classes = self.num_classes  # name_to_class lives on the CPU: no device sync
        if num_classes == len(self.name_to_class) and torch.equal(
            self.name_to_class, torch.arange(num_classes, device=self.name_to_class.device)
        ):
            # One name per class, in class order: the scores already are per class, and the scatter below would
            # only copy them into a new full-size tensor.
            return name_scores
        scores = name_scores.movedim(dim, 0)
        # One scatter for all classes (no per-class host sync); every class has at least one name, so
        # `include_self=False` leaves no slot at its zero initial value.
        index = self.name_to_class.to(scores.device).view(-1, *([1] * (scores.ndim - 1))).expand_as(scores)
        per_class = scores.new_zeros((num_classes, *scores.shape[1:]))
        per_class = per_class.scatter_reduce(0, index, scores, reduce="amax", include_self=False)
        return per_class.movedim(0, dim)


@dataclass
class SlideInferenceOutput(ModelOutput):
    r"""
    logits (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
        Per-pixel mean of the windows' logits over the windows covering the pixel.
    count_map (`torch.FloatTensor` of shape `(height, width)`):
        Number of windows covering each pixel (never 0).
    """

    logits: torch.FloatTensor | None = None
    count_map: torch.FloatTensor | None = None


def _normalised_name(name: str) -> str:
    """The key under which two names embed identically: CLIP's tokenizer lower-cases and collapses whitespace."""
    return " ".join(name.lower().split())


def _names_of_entry(index: int, entry) -> tuple[str, ...]:
    if isinstance(entry, str):
        names = entry.split(";")
    elif isinstance(entry, Sequence) and all(isinstance(name, str) for name in entry):
        names = list(entry)
    else:
        raise ValueError(f"Class {index} is {entry!r}: give each class as a string or a list of strings.")
    names = tuple(name.strip() for name in names if name.strip())
    if not names:
        raise ValueError(f"Class {index} ({entry!r}) holds no name.")
    return names


def _check_names_are_unique(classes: list[tuple[str, ...]]) -> None:
    """Each name may belong to one class, once: a repeated class ties with its first copy everywhere (the argmax
    keeps the first, so the copy is never predicted), and a name shared by two classes ties them wherever it wins."""
    owners: dict[str, list[int]] = {}
    for index, names in enumerate(classes):
        for name in names:
            owners.setdefault(_normalised_name(name), []).append(index)
    repeated = {name: indices for name, indices in owners.items() if len(indices) > 1}
    if repeated:
        listed = "; ".join(f"{name!r} in classes {indices}" for name, indices in list(repeated.items())[:5])
        raise ValueError(
            f"Class names must be unique (case and spacing ignored, as CLIP's tokenizer does): {listed}. "
            "A repeated class could never be predicted and a shared name ties its classes; merge synonyms into "
            "one class (\"person; people\") and drop the repeats."
        )


def split_class_names(
    class_names: Sequence[str | Sequence[str]], allow_shared_names: bool = False
) -> list[tuple[str, ...]]:
    """One tuple of names per class: `"person; people"` and `["person", "people"]` both give two names.

    `class_names` must be a list (or tuple) with one entry per class; a bare string is refused rather than read
    letter by letter. Every name must be unique across the whole list (see `_check_names_are_unique`), unless
    `allow_shared_names` (only for reproducing a published class list that has such a name).
    """
    if isinstance(class_names, str):
        raise ValueError(
            f"Class names must be a list with one entry per class, got the string {class_names!r}; "
            f"pass [{class_names!r}] for one class, or a list such as ['cat', 'dog; puppy']."
        )
    classes = [_names_of_entry(index, entry) for index, entry in enumerate(class_names)]
    if not classes:
        raise ValueError("Got an empty class list.")
    if not allow_shared_names:
        _check_names_are_unique(classes)
    return classes


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_inference_settings(
    shorter_side: int = 448,
    max_longer_side: int = 2048,
    window: int = 336,
    stride: int = 112,
    logit_scale: float = 40.0,
    background_threshold: float | None = None,
    spell: Callable[[str], str] = str,
) -> None:
    """Raise a ValueError naming the setting (as `spell(name)` writes it, e.g. a CLI flag) when it cannot give
    finite, fully covered scores: sizes must be positive integers, `stride <= window` (a larger stride leaves
    pixels between windows that no window covers), `logit_scale` finite and positive, `background_threshold` in
    [0, 1]."""
    for name, value in (("shorter_side", shorter_side), ("max_longer_side", max_longer_side), ("window", window),
                        ("stride", stride)):
        _require_positive_int(spell(name), value)
    if stride > window:
        raise ValueError(
            f"{spell('stride')} ({stride}) is larger than {spell('window')} ({window}): the pixels between two "
            f"windows would be covered by none. Use {spell('stride')} <= {spell('window')} (the protocol: 336, 112)."
        )
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real) or not (
        math.isfinite(logit_scale) and logit_scale > 0
    ):
        raise ValueError(f"{spell('logit_scale')} must be a finite positive number, got {logit_scale!r}.")
    if background_threshold is not None and not (
        isinstance(background_threshold, numbers.Real) and 0 <= background_threshold <= 1
    ):
        raise ValueError(
            f"{spell('background_threshold')} must lie in [0, 1] (or be unset), got {background_threshold!r}."
        )


_CHECK_WEIGHTS = "Check the checkpoint's weights (a diverged training run saves NaN tensors)."


def require_finite(tensor: torch.Tensor, what: str, fix: str = _CHECK_WEIGHTS) -> torch.Tensor:
    """`tensor`, or a ValueError when it holds NaN or inf: a non-finite score must never become a label or a metric."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} hold NaN or inf values, so no prediction is made from them. {fix}")
    return tensor


def sliding_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's `slide_inference` grid: windows (y1, y2, x1, x2) start every `stride` pixels and the last one is
    shifted back inside the image, so every pixel is covered; windows shrink to the image when it is smaller."""
    if stride <= 0 or window <= 0 or stride > window:
        raise ValueError(f"Need 0 < stride <= window, got window {window} and stride {stride}: a stride larger "
                         "than the window leaves pixels that no window covers.")
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + window, height), min(col * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def slide_inference(
    image_tensor: torch.Tensor,
    dense_logits_fn: Callable[[torch.Tensor], torch.Tensor],
    window: int,
    stride: int,
    num_classes: int,
    windows_per_batch: int = 16,
) -> SlideInferenceOutput:
    """Average `dense_logits_fn` over sliding windows.

    Args:
        image_tensor: (B, 3, H, W).
        dense_logits_fn: maps window crops (n, 3, h, w) to logits (n, num_classes, h, w) at the crops' resolution.
        window, stride: square window side and step in pixels.
        num_classes: channels returned by `dense_logits_fn`.
        windows_per_batch: crops per `dense_logits_fn` call (all windows of an image have the same size).
    """
    batch_size, _, height, width = image_tensor.shape
    boxes = sliding_windows(height, width, window, stride)
    logits = image_tensor.new_zeros((batch_size, num_classes, height, width), dtype=torch.float32)
    count_map = image_tensor.new_zeros((height, width), dtype=torch.float32)
    for start in range(0, len(boxes), windows_per_batch):
        chunk = boxes[start : start + windows_per_batch]
        crops = torch.cat([image_tensor[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # (len(chunk) * B, 3, h, w)
        crop_logits = dense_logits_fn(crops).float().split(batch_size)
        for (y1, y2, x1, x2), window_logits in zip(chunk, crop_logits):
            logits[:, :, y1:y2, x1:x2] += window_logits
            count_map[y1:y2, x1:x2] += 1
    return SlideInferenceOutput(logits=logits.div_(count_map), count_map=count_map)  # in place: no second full map


def resized_shape(height: int, width: int, shorter_side: int, max_longer_side: int = 2048) -> tuple[int, int]:
    """mmcv's keep-ratio rescale to `scale=(max_longer_side, shorter_side)`: the shorter side becomes
    `shorter_side` unless the longer side would then exceed `max_longer_side`."""
    scale = min(max_longer_side / max(height, width), shorter_side / min(height, width))
    # At least one pixel: a 1 x 5000 strip would otherwise round to height 0.
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def patch_padding(height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to a multiple of the patch size, split evenly as in SCLIP."""
    pad_width, pad_height = -width % patch_size, -height % patch_size
    return pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2


def _array_to_channels_first(array: np.ndarray) -> torch.Tensor:
    """numpy images are channels last, as PIL gives them: (H, W) grey, (H, W, 1) grey or (H, W, 3) RGB."""
    if array.ndim == 3 and array.shape[-1] in (1, 3):
        array = array.transpose(2, 0, 1)
    elif array.ndim != 2:
        raise ValueError(
            f"Expected a numpy image of shape (H, W, 3) or (H, W), got {array.shape}; drop an alpha channel with "
            "image[..., :3], and pass channels-first data as a torch tensor."
        )
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Expected uint8 (0-255) or float (0-1) pixels, got dtype {array.dtype}.")
    return torch.from_numpy(np.array(array))  # a copy: PIL's arrays are read-only


def image_to_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 1] from one image:

    - a PIL image of any mode (converted to RGB);
    - a numpy array, channels last as PIL gives them: (H, W, 3) RGB, or (H, W) / (H, W, 1) grey;
    - a torch tensor, channels first as torchvision has them: (3, H, W) RGB, or (H, W) / (1, H, W) grey.

    Grey images are repeated to three channels. uint8 values are read as 0-255; floating values must lie in [0, 1]
    (a float image in 0-255 would otherwise be silently saturated). Anything else, an alpha channel or an image
    with no pixels included, is a ValueError saying what to pass.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = _array_to_channels_first(image)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"Expected a PIL image, numpy array or torch tensor, got {type(image).__name__}.")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"Expected an image tensor of shape (3, H, W) or (H, W), got {tuple(image.shape)}; drop an alpha "
            "channel with image[:3], and pass channels-last data as a numpy array."
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"The image has no pixels (height {image.shape[1]}, width {image.shape[2]}).")
    image = image.expand(3, -1, -1)
    if image.dtype == torch.uint8:
        return image.float() / 255
    if not image.is_floating_point():
        raise ValueError(f"Expected uint8 (0-255) or float (0-1) pixels, got dtype {image.dtype}.")
    image = require_finite(image.float(), "The image's pixels", fix="Pass finite values in [0, 1].")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(
            f"Float pixels must lie in [0, 1], got values in [{image.min().item():.4g}, {image.max().item():.4g}]; "
            "divide 0-255 values by 255 or pass uint8."
        )
    return image


def _require_all_weights(loading_info: dict, what: str, fix: str) -> None:
    """transformers only logs missing weights (and we silence its report, see `quiet_transformers`): a tower built
    partly at random must be an error, or every score made with it is silently meaningless."""
    missing = sorted(loading_info["missing_keys"])
    if missing:
        raise ValueError(
            f"{what} lacks {len(missing)} weight(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) "
            f"and would be random there. {fix}"
        )


def _load_vision_tower(name_or_path: str, **kwargs) -> DeCLIPVisionModel:
    # Quiet: loading the vision tower of a full CLIP checkpoint lists every text weight as unexpected.
    with quiet_transformers():
        # An EVA02 DeCLIP folder loads as DeCLIPEvaVisionModel; both share the dense API the segmenter reads.
        model_class = declip_vision_class(name_or_path, **kwargs)
        vision_model, loading_info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    _require_all_weights(
        loading_info, f"The vision tower loaded from {str(name_or_path)!r}",
        fix="Pass a DeCLIP or CLIP checkpoint (a DINOv2 or other ViT folder is not one).",
    )
    return vision_model


# Configs a CLIP text tower loads from: a text tower's own, or a full CLIPModel's (which holds `text_config`).
_CLIP_TEXT_MODEL_TYPES = ("clip_text_model", "clip")


def _text_tower_subfolder(name_or_path: str, hub_kwargs: dict) -> str:
    """Where a checkpoint keeps its CLIP text tower: DeCLIP folders under `text_encoder/`, CLIP ones at the root."""
    for subfolder in (TEXT_ENCODER_SUBFOLDER, ""):
        try:
            config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, subfolder=subfolder, **hub_kwargs)
        except (OSError, ValueError):
            continue
        # Checked before loading: CLIPTextModelWithProjection would otherwise build a random tower from a vision
        # (or SigLIP, ...) config and only warn.
        if config_dict.get("model_type") in _CLIP_TEXT_MODEL_TYPES:
            return subfolder
    raise ValueError(
        f"{name_or_path!r} holds no CLIP text tower (neither a `{TEXT_ENCODER_SUBFOLDER}/` subfolder nor a CLIPModel "
        "config at its root); pass `text_model=` (`--text-model`) a CLIP checkpoint with the matching text encoder."
    )


def _load_text_tower(name_or_path: str, hub_kwargs: dict) -> tuple[CLIPTextModelWithProjection, object]:
    subfolder = _text_tower_subfolder(str(name_or_path), hub_kwargs)
    # Quiet: loading the text tower of a full CLIP checkpoint lists every vision weight as unexpected.
    with quiet_transformers():
        text_model, loading_info = CLIPTextModelWithProjection.from_pretrained(
            name_or_path, subfolder=subfolder, output_loading_info=True, **hub_kwargs
        )
    where = f"{name_or_path}/{subfolder}" if subfolder else str(name_or_path)
    _require_all_weights(
        loading_info, f"The text tower loaded from {where!r}",
        fix="Pass `text_model=` (`--text-model`) a CLIP checkpoint holding the matching text encoder.",
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder=subfolder, **hub_kwargs)
    if len(tokenizer) > text_model.config.vocab_size:
        raise ValueError(
            f"The tokenizer of {where!r} has {len(tokenizer)} tokens but its text tower embeds only "
            f"{text_model.config.vocab_size}; save the tokenizer that belongs to this text encoder beside it."
        )
    return text_model.eval(), tokenizer


def load_text_tower(name_or_path: str, **hub_kwargs) -> tuple[CLIPTextModelWithProjection, object]:
    """The CLIP text tower and tokenizer of a checkpoint (its `text_encoder/` subfolder, else its root), checked as
    `DeCLIPSegmenter.from_pretrained` checks them; e.g. to build a segmenter around a vision model in training.
    `text_tower_subfolder(name_or_path)` finds the tower without loading it (a ValueError naming the fix if none)."""
    return _load_text_tower(str(name_or_path), hub_kwargs)


def text_tower_subfolder(name_or_path: str, **hub_kwargs) -> str:
    return _text_tower_subfolder(str(name_or_path), hub_kwargs)


def _check_towers_match(vision_model: DeCLIPVisionModel, text_model: CLIPTextModelWithProjection) -> None:
    vision_dim, text_dim = vision_model.config.projection_dim, text_model.config.projection_dim
    if vision_dim != text_dim:
        raise ValueError(
            f"The vision tower projects to {vision_dim} dimensions but the text tower to {text_dim}: they come "
            "from different CLIP models. Pass the text encoder of the CLIP the vision model was trained from."
        )


def _images_to_tensors(images) -> list[torch.Tensor]:
    """(3, H, W) tensors in [0, 1] from one image or a list (or 4-D batch) of them; errors name the bad image."""
    if isinstance(images, Image.Image) or (isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim in (2, 3)):
        images = [images]  # a single image
    tensors = []
    for index, image in enumerate(images):
        try:
            tensors.append(image_to_tensor(image))
        except ValueError as error:
            raise ValueError(f"Image {index}: {error}") from None
    if not tensors:
        raise ValueError("Got no images to segment; pass a list holding at least one image.")
    return tensors


class DeCLIPSegmenter(nn.Module):
    r"""
    Zero-shot semantic segmentation from a list of class names.

    Holds a [`DeCLIPVisionModel`], the matching CLIP text tower and tokenizer, and the image normalisation. Text
    embeddings are cached per name, so a class list is encoded once.

    Example:

    ```python
    >>> from PIL import Image
    >>> from declip_hf import DeCLIPSegmenter

    >>> segmenter = DeCLIPSegmenter.from_pretrained("openai/clip-vit-base-patch16").to("cuda")
    >>> output = segmenter([Image.open("street.jpg")], ["road", "car; vehicle", "person", "sky"])
    >>> output.label_maps[0].shape  # (H, W) of the input image, values are indices into the class list
    ```
    """

    def __init__(
        self,
        vision_model: DeCLIPVisionModel,
        text_model: CLIPTextModelWithProjection,
        tokenizer,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
    ):
        super().__init__()
        self.vision_model = vision_model
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self.register_buffer("image_mean", torch.tensor(image_mean).float().view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).float().view(3, 1, 1), persistent=False)
        # name -> (projection_dim,) embedding on the CPU, shared by every class list that uses the name.
        self._name_embedding_cache: dict[str, torch.Tensor] = {}
        self.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str, text_model=None, tokenizer=None, **kwargs) -> "DeCLIPSegmenter":
        """Load the vision side from `name_or_path` (DeCLIP or CLIP checkpoint, local or Hub id).

        The text tower comes from `text_model` when given (a [`CLIPTextModelWithProjection`], then also pass
        `tokenizer`, or a checkpoint name/path), else from `name_or_path`'s `text_encoder/` subfolder, else from its
        root (a plain CLIP checkpoint). A tower whose checkpoint lacks any of its weights is a ValueError, never a
        partly random model; the "unexpected weights" of the other tower in a full CLIP checkpoint are expected and
        not reported. Other keyword arguments go to `DeCLIPVisionModel.from_pretrained`
        (e.g. `decoupled_attention="csa"`, `dtype=torch.float16`).
        """
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        vision_model = _load_vision_tower(name_or_path, **kwargs)
        if text_model is None or isinstance(text_model, (str, os.PathLike)):
            text_model, found_tokenizer = _load_text_tower(text_model or name_or_path, hub_kwargs)
            tokenizer = tokenizer or found_tokenizer
        elif tokenizer is None:
            raise ValueError("Pass the `tokenizer` that goes with the given `text_model`.")
        _check_towers_match(vision_model, text_model)
        image_mean, image_std = image_normalisation(name_or_path, **hub_kwargs)
        return cls(vision_model.eval(), text_model.eval(), tokenizer, image_mean, image_std)

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    @torch.no_grad()
    def encode_classes(
        self, class_names: Sequence[str | Sequence[str]], batch_size: int = 256, allow_shared_names: bool = False
    ) -> ClassEmbeddings:
        """Text embeddings of every name: normalise(mean over templates of normalised template embeddings)."""
        classes = split_class_names(class_names, allow_shared_names)
        missing = sorted({name for names in classes for name in names} - self._name_embedding_cache.keys())
        for name, embedding in zip(missing, self._embed_names(missing, batch_size)):
            self._name_embedding_cache[name] = embedding
        return ClassEmbeddings(
            name_embeds=torch.stack([self._name_embedding_cache[name] for names in classes for name in names]),
            name_to_class=torch.tensor([index for index, names in enumerate(classes) for _ in names]),
        )

    def _embed_names(self, names: list[str], batch_size: int) -> list[torch.Tensor]:
        prompt_sets = [[template.format(name) for template in self.templates] for name in names]
        return list(self.embed_prompt_ensembles(prompt_sets, batch_size))

    @torch.no_grad()
    def embed_prompt_ensembles(self, prompt_sets: Sequence[Sequence[str]], batch_size: int = 256) -> torch.Tensor:
        """(len(prompt_sets), projection_dim) on the CPU: per set, normalise(mean of its normalised prompt
        embeddings). Sets may differ in length (e.g. ViLD prompts whose article depends on the name)."""
        if not prompt_sets:
            return torch.zeros(0, self.text_model.config.projection_dim)
        prompts = [prompt for prompt_set in prompt_sets for prompt in prompt_set]
        text_device = next(self.text_model.parameters()).device
        embeds = []
        # Outside any caller's autocast: the embeddings are cached and reused, so compute them once at full precision.
        with torch.autocast(text_device.type, enabled=False):
            for start in range(0, len(prompts), batch_size):
                tokens = self.tokenizer(
                    prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt"
                ).to(text_device)
                embeds.append(F.normalize(self.text_model(**tokens).text_embeds.float(), dim=-1).cpu())
        per_prompt = torch.cat(embeds).split([len(prompt_set) for prompt_set in prompt_sets])
        return F.normalize(torch.stack([set_embeds.mean(dim=0) for set_embeds in per_prompt]), dim=-1)

    @torch.no_grad()
    def forward(
        self,
        images: Sequence[Image.Image | np.ndarray | torch.Tensor],
        class_names: Sequence[str | Sequence[str]] | ClassEmbeddings,
        shorter_side: int = 448,
        max_longer_side: int = 2048,
        window: int = 336,
        stride: int = 112,
        logit_scale: float = 40.0,
        background_threshold: float | None = None,
        return_probabilities: bool = False,
        windows_per_batch: int = 16,
        area_threshold: float | None = None,
        refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> DeCLIPSegmentationOutput:
        """Segment `images` (any sizes) into `class_names`; images of the same size are batched together.

        Args:
            images: a list of images, or one image: PIL images, numpy arrays (H, W, 3) or (H, W), torch tensors
                (3, H, W) or (H, W); uint8 or float in [0, 1] (see `image_to_tensor`). A 4-D array or tensor is a
                batch. An empty list, an image without pixels or one with an alpha channel is a ValueError.
            class_names: a list with one entry per class ("cat", "person; people" or ["person", "people"]), or
                its precomputed `encode_classes` output. Names must be unique across classes, and a bare string is
                refused (see `split_class_names`).
            shorter_side, max_longer_side: test-time resize keeping the aspect ratio (see `resized_shape`).
            window, stride: sliding window in pixels of the resized image, `0 < stride <= window`. Each window is
                zero-padded (after normalisation, i.e. with the mean colour) to a multiple of the patch size and its
                logits cropped back, so any window and image size works.
            logit_scale: multiplies the cosine similarities before the softmax over names; finite and positive.
            background_threshold: if set (in [0, 1]), pixels whose highest class probability is below it get class
                0 (use it when class 0 is a background class).
            area_threshold: SCLIP's `area_thd` (with a background class): before the argmax, every non-background
                class predicted on at most this share of the image's non-background pixels is removed.
            refine: optional `refine(image, similarities)` applied to the similarity maps at the original size
                before the logit scale, e.g. `declip_hf.segmentation.pamr.PAMR()`; gets the normalised resized image
                brought back to the original size (1, 3, H, W) and the maps (1, num_names, H, W), as NACLIP and SCLIP do.

        Raises:
            ValueError: for any setting or input above that cannot give a meaningful map, and when a score turns
                out NaN or inf (e.g. NaN weights): a non-finite score never becomes a label.
        """
        check_inference_settings(shorter_side, max_longer_side, window, stride, logit_scale, background_threshold)
        classes = class_names if isinstance(class_names, ClassEmbeddings) else self.encode_classes(class_names)
        classes.check()
        name_embeds = classes.name_embeds.to(self.device)
        tensors = _images_to_tensors(images)
        label_maps = [None] * len(tensors)
        probabilities = [None] * len(tensors) if return_probabilities else None
        for indices, resized in self._batches_of_equal_size(tensors, shorter_side, max_longer_side):
            # The similarity maps are checked at the patch grid, before upsampling: a bilinear blend and a mean
            # of finite values stay finite, and the check then costs a fraction of one on the full-size maps.
            what = f"The similarity maps of images {indices}"
            averaged = slide_inference(
                resized, lambda crops: self.window_logits(crops, name_embeds, check_finite=what), window, stride,
                num_classes=len(name_embeds), windows_per_batch=windows_per_batch,
            ).logits
            for index, cosine, image in zip(indices, averaged, resized):
                original_size = tuple(tensors[index].shape[-2:])
                # As in SCLIP / NACLIP: the window average is upsampled first, then refined, scaled and softmaxed.
                cosine = F.interpolate(cosine[None], size=original_size, mode="bilinear", align_corners=False)
                if refine is not None:
                    image = F.interpolate(image[None], size=original_size, mode="bilinear", align_corners=False)
                    cosine = refine(image, cosine)
                # In place when `cosine` is the interpolation's own new tensor (a per-class full-size map is large);
                # a refinement's output may be a tensor it keeps, so that one is not overwritten.
                scaled = cosine[0].mul_(logit_scale) if refine is None else cosine[0] * logit_scale
                class_probs = classes.max_over_names(scaled.softmax(dim=0), dim=0)
                label_maps[index] = _threshold_labels(
                    class_probs, background_threshold, area_threshold,
                    check_finite=f"The class probabilities of image {index}",
                )
                if probabilities is not None:
                    probabilities[index] = class_probs.cpu()  # on the CPU, like the label maps
        return DeCLIPSegmentationOutput(label_maps=label_maps, probabilities=probabilities)

    def _batches_of_equal_size(self, tensors: list[torch.Tensor], shorter_side: int, max_longer_side: int):
        """Yield (indices, normalised resized batch (B, 3, h, w)) per group of images with the same size."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(tensors):
            groups.setdefault(tuple(tensor.shape[-2:]), []).append(index)
        for (height, width), indices in groups.items():
            batch = torch.stack([tensors[index] for index in indices]).to(self.device)
            # Bilinear without antialiasing: what mmcv's cv2 resize does at test time.
            batch = F.interpolate(
                batch, size=resized_shape(height, width, shorter_side, max_longer_side), mode="bilinear",
                align_corners=False,
            )
            yield indices, (batch - self.image_mean) / self.image_std

    def window_logits(
        self, crops: torch.Tensor, name_embeds: torch.Tensor, check_finite: str | None = None
    ) -> torch.Tensor:
        """Cosine similarity (n, num_names, h, w) of every pixel of window crops (n, 3, h, w) with every name.
        With `check_finite` (what to call the maps in the error), a ValueError when a patch's score is NaN or inf."""
        _, _, height, width = crops.shape
        left, right, top, bottom = patch_padding(height, width, self.vision_model.patch_size)
        padded = F.pad(crops, (left, right, top, bottom))
        dense = self.vision_model.get_dense_features(padded).dense_embeds  # (n, D, h / p, w / p), normalised
        cosine = torch.einsum("ndhw,qd->nqhw", dense.float(), name_embeds.float())
        if check_finite is not None:
            require_finite(cosine, check_finite)
        cosine = F.interpolate(cosine, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return cosine[:, :, top : top + height, left : left + width]



def _drop_small_classes(class_probs: torch.Tensor, area_threshold: float) -> torch.Tensor:
    """SCLIP's `area_thd`: the probabilities of every non-background class whose argmax area is at most
    `area_threshold` times the image's non-background argmax area are set to 0 (num_classes, H, W)."""
    num_classes = class_probs.shape[0]
    areas = torch.bincount(class_probs.argmax(dim=0).flatten(), minlength=num_classes)[1:].to(class_probs.dtype)
    keep = (areas > area_threshold * areas.sum()).to(class_probs.dtype)
    return torch.cat([class_probs[:1], class_probs[1:] * keep[:, None, None]])


def _threshold_labels(
    class_probs: torch.Tensor, background_threshold: float | None, area_threshold: float | None = None,
    check_finite: str | None = None,
) -> torch.LongTensor:
    """Label map (H, W) from class probabilities (num_classes, H, W). With `check_finite` (what to call the
    probabilities in the error), a ValueError when any probability is NaN: `max` propagates NaN, so checking the
    (H, W) maximum covers all classes (softmax never gives inf)."""
    if area_threshold is not None:
        class_probs = _drop_small_classes(class_probs, area_threshold)
    max_probs, labels = class_probs.max(dim=0)
    if check_finite is not None:
        require_finite(max_probs, check_finite)
    if background_threshold is not None:
        labels[max_probs < background_threshold] = 0
    return labels.cpu()
