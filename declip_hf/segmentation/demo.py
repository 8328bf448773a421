"""Interactive DeCLIP demo in the browser (Gradio): segment an image into your words, and click a point to see how
the model relates it to the rest of the image (DeCLIP, CVPR 2025, arXiv 2505.04410).

    pip install "declip-hf[demo]"
    declip-demo --model PATH_OR_ID [--host 127.0.0.1] [--port 7860]

Upload an image and type class names (comma-separated, synonyms of one class separated by ";"): the page shows
the segmentation overlay with a legend. Click a point on the input image: the page shows that patch's context
correlation map (the cosine similarity of its context feature with every other patch's, the quantity DeCLIP's
context loss aligns with a VFM, docs/method.md §4.2) and its final-layer attention in the model's decoupled mode
(docs/method.md §1.2). --model is any compatible checkpoint, as for `declip-segment`.
"""

import argparse
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers.image_processing_base import ImageProcessingMixin

from ..analysis import context_correlation, final_layer_attention, grid_size, point_to_patch_index
from ..models.preprocessing import TRAINING_SIZE_FIELD, prepare_dense_inputs
from .cli import add_model_arguments, check_model_arguments, exits_on_user_error, flag, load_segmenter, make_parser
from .segment import legend_overlay
from .segmenter import DeCLIPSegmenter, check_inference_settings

DEFAULT_MAP_SIZE = 448
# Five stops of matplotlib's viridis: dark blue (low) -> yellow (high); readable over any photo and for colour-blind
# viewers, without needing matplotlib.
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float32)
_MAP_OPACITY = 0.6
_MIN_MARKER_RADIUS = 5
EXAMPLE_LABELS = "sky, tree; grass, building, person, road"


@dataclass
class DemoSettings:
    """How the demo segments and at which input size it computes the point maps.

    shorter_side, window, stride, logit_scale, windows_per_batch: as for `DeCLIPSegmenter.forward`.
    map_size (`int`): side of the letterboxed square the point maps are computed on (a multiple of the patch size).
    """

    shorter_side: int = 448
    window: int = 336
    stride: int = 112
    logit_scale: float = 40.0
    windows_per_batch: int = 16
    map_size: int = DEFAULT_MAP_SIZE


@dataclass
class PointMaps:
    """The two maps of one clicked patch, rendered over the image, and what they show in words."""

    correlation: Image.Image
    attention: Image.Image
    caption: str


# --------------------------------------------------------------------------------------------------------------------
# What the page computes; plain functions of the segmenter and PIL images, tested without a browser.
# --------------------------------------------------------------------------------------------------------------------


def recorded_training_size(name_or_path: str) -> int | None:
    """The training resolution a released model's image processor records, if any."""
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except OSError:
        return None
    size = processor.get(TRAINING_SIZE_FIELD)
    return size if isinstance(size, int) and size > 0 else None


def parse_labels(text: str) -> list[str]:
    """Class entries from the text box: comma-separated, `;` between synonyms (checked by the segmenter)."""
    entries = [entry.strip() for entry in (text or "").split(",") if entry.strip()]
    if not entries:
        raise ValueError('Type at least one class name, e.g. "sky, tree; grass, person" (commas between classes).')
    return entries


def _require_image(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError("Upload an image first.")
    return image.convert("RGB")


def segment_image(segmenter: DeCLIPSegmenter, image: Image.Image, labels: str, settings: DemoSettings):
    """(overlay with legend, one line naming each class's share of the image) for the typed class names."""
    image, class_names = _require_image(image), parse_labels(labels)
    output = segmenter(
        [image], class_names, shorter_side=settings.shorter_side, window=settings.window, stride=settings.stride,
        logit_scale=settings.logit_scale, windows_per_batch=settings.windows_per_batch,
    )
    overlay, names, areas = legend_overlay(image, output.label_maps[0], class_names)
    return overlay, ", ".join(f"{name} {area:.1%}" for name, area in zip(names, areas))


def clicked_patch(x: float, y: float, image_size: tuple[int, int], grid: tuple[int, int]) -> int:
    """Row-major index of the patch under pixel (x, y) of the original image, on the `grid` of its letterboxed
    square (`prepare_dense_inputs`: longest side scaled to the square's, image at the top left)."""
    width, height = image_size
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"The point ({x:g}, {y:g}) lies outside the {width}x{height} image; click on the image.")
    side = max(width, height)  # the square's side in original pixels
    return point_to_patch_index(x / side, y / side, grid)


def heatmap_overlay(image: Image.Image, values: torch.Tensor, low: float, high: float, map_size: int,
                    point: tuple[float, float]) -> Image.Image:
    """`values` (h, w) on the letterboxed square, coloured (viridis, `low`..`high`) over the image at its own size,
    with the clicked point marked."""
    width, height = image.size
    scale = map_size / max(width, height)
    shown_width, shown_height = max(1, round(width * scale)), max(1, round(height * scale))
    # Nearest: each patch stays one visible square, so a reader sees the model's own resolution.
    square = F.interpolate(values[None, None].float().cpu(), size=(map_size, map_size), mode="nearest")[0, 0]
    unit = ((square[:shown_height, :shown_width] - low) / max(high - low, 1e-12)).clamp(0, 1).numpy()
    colours = np.stack([np.interp(unit, np.linspace(0, 1, len(_VIRIDIS)), _VIRIDIS[:, c]) for c in range(3)], -1)
    layer = Image.fromarray(colours.astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    blended = Image.blend(image.convert("RGB"), layer, _MAP_OPACITY)
    x, y, r = point[0], point[1], marker_radius(image.size)
    ImageDraw.Draw(blended).ellipse([x - r, y - r, x + r, y + r], outline=(255, 0, 0), width=max(2, r // 3))
    return blended


def marker_radius(image_size: tuple[int, int]) -> int:
    """The clicked point's ring: visible on a phone photo as on a thumbnail."""
    return max(_MIN_MARKER_RADIUS, max(image_size) // 80)


def point_maps(segmenter: DeCLIPSegmenter, image: Image.Image, x: float, y: float, settings: DemoSettings) -> PointMaps:
    """The context correlation map and the final-layer attention of the patch under (x, y), over the image."""
    image = _require_image(image)
    model = segmenter.vision_model
    pixel_values = prepare_dense_inputs(
        image, settings.map_size, segmenter.image_mean.flatten().tolist(), segmenter.image_std.flatten().tolist()
    ).to(segmenter.device, model.dtype)
    grid = grid_size(model, pixel_values)
    query_index = clicked_patch(x, y, image.size, grid)
    try:
        correlation = context_correlation(model, pixel_values, query_index)[0]
    except ValueError as error:  # a baseline mode: no context features
        raise ValueError(f"{error} In the demo: restart it with --decoupled-attention qq (or csa, ...).") from None
    attention = final_layer_attention(model, pixel_values, query_index)
    # The colour scale tops at the largest weight on the image itself: the letterbox's padding is not drawn.
    width, height = image.size
    shown_rows, shown_columns = (math.ceil(side * grid[0] / max(width, height)) for side in (height, width))
    peak = attention[:shown_rows, :shown_columns].max().item()
    row, column = divmod(query_index, grid[1])
    caption = (
        f"Patch (row {row}, column {column}) of the {grid[0]}x{grid[1]} grid at {settings.map_size} px. "
        "Correlation: cosine of its context feature with every patch's, coloured from -1 to 1. Attention: its "
        f"final-layer '{model.config.decoupled_attention}' weights (row normalised, mean over heads), coloured from "
        f"0 to {peak:.3g} (the largest on the image)."
    )
    return PointMaps(
        correlation=heatmap_overlay(image, correlation, -1.0, 1.0, settings.map_size, (x, y)),
        attention=heatmap_overlay(image, attention, 0.0, peak, settings.map_size, (x, y)),
        caption=caption,
    )


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------


def _shown_to_user(function):
    """Gradio shows a `gr.Error` as a message on the page; any other exception only as a generic "Error"."""
    import gradio as gr

    @functools.wraps(function)  # Gradio reads the parameter names for its API page
    def wrapper(*args):
        try:
            return function(*args)
        except ValueError as error:
            raise gr.Error(" ".join(str(error).split())) from None

    return wrapper


def build_demo(segmenter: DeCLIPSegmenter, settings: DemoSettings | None = None, title: str = "DeCLIP"):
    """The Gradio page (a `gr.Blocks`, not launched). Its API endpoints `/segment` (image, labels) -> (overlay,
    areas) and `/point_maps` (image, x, y) -> (correlation, attention, caption) are what the page's buttons call."""
    import gradio as gr

    settings = settings or DemoSettings()

    def segment(image, labels):
        return segment_image(segmenter, image, labels, settings)

    def maps(image, x, y):
        if x is None or y is None:
            raise ValueError("Click a point on the input image (or type its x and y) first.")
        result = point_maps(segmenter, image, float(x), float(y), settings)
        return result.correlation, result.attention, result.caption

    def select_point(event: gr.SelectData):
        return event.index[0], event.index[1]

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nUpload an image and type class names (commas between classes, `;` between synonyms of one "
            "class), then **Segment**. Click a point on the input image to see its context correlation map and its "
            "final-layer attention."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Input image (click a point)", sources=["upload", "clipboard"],
                                 elem_id="image")
                labels = gr.Textbox(label="Class names", value=EXAMPLE_LABELS, elem_id="labels")
                segment_button = gr.Button("Segment", variant="primary", elem_id="segment")
                with gr.Row():
                    x = gr.Number(label="x (pixels)", precision=0)
                    y = gr.Number(label="y (pixels)", precision=0)
                maps_button = gr.Button("Show point maps")
            with gr.Column():
                overlay = gr.Image(type="pil", label="Segmentation", format="png", interactive=False,
                                   elem_id="overlay")
                areas = gr.Textbox(label="Share of the image", interactive=False, elem_id="areas")
        with gr.Row():
            correlation = gr.Image(type="pil", label="Context correlation", format="png", interactive=False,
                                   elem_id="correlation")
            attention = gr.Image(type="pil", label="Final-layer attention", format="png", interactive=False,
                                 elem_id="attention")
        caption = gr.Markdown(elem_id="caption")
        map_outputs = [correlation, attention, caption]
        segment_button.click(_shown_to_user(segment), [image, labels], [overlay, areas], api_name="segment")
        labels.submit(_shown_to_user(segment), [image, labels], [overlay, areas], api_name=False)
        maps_button.click(_shown_to_user(maps), [image, x, y], map_outputs, api_name="point_maps")
        image.select(select_point, None, [x, y], api_name=False).then(
            _shown_to_user(maps), [image, x, y], map_outputs, api_name=False
        )
    return demo


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to serve on; 0.0.0.0 makes the page reachable from other machines.")
    parser.add_argument("--port", type=int, default=None, help="Port (unset: Gradio's first free one from 7860).")
    parser.add_argument("--map-size", type=int, default=None,
                        help="Side in pixels of the square the point maps are computed on (unset: the training size "
                        f"the model's image processor records, else {DEFAULT_MAP_SIZE}); a multiple of the patch size.")
    parser.add_argument("--shorter-side", type=int, default=448, help="Segmentation: resize the shorter side to this.")
    parser.add_argument("--window", type=int, default=336, help="Segmentation: sliding-window size in pixels.")
    parser.add_argument("--stride", type=int, default=112, help="Segmentation: sliding-window stride (<= --window).")
    parser.add_argument("--logit-scale", type=float, default=40.0,
                        help="Segmentation: scale of the cosine similarities before the softmax.")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The checked settings, before the model loads; `map_size` is resolved against the model in `load_demo`."""
    check_inference_settings(shorter_side=args.shorter_side, window=args.window, stride=args.stride,
                             logit_scale=args.logit_scale, spell=flag)
    if args.map_size is not None and args.map_size <= 0:
        raise ValueError(f"--map-size must be a positive number of pixels, got {args.map_size}.")
    check_model_arguments(args)
    return DemoSettings(shorter_side=args.shorter_side, window=args.window, stride=args.stride,
                        logit_scale=args.logit_scale, windows_per_batch=args.windows_per_batch,
                        map_size=args.map_size or 0)


def resolve_map_size(requested: int, model_name_or_path: str, patch_size: int) -> int:
    """`requested` (0: the model's recorded training size, else DEFAULT_MAP_SIZE), which must fit the patch grid."""
    if requested:
        if requested % patch_size:
            raise ValueError(f"--map-size {requested} is not a multiple of the patch size {patch_size}; "
                             f"use {max(patch_size, requested - requested % patch_size)}.")
        return requested
    size = recorded_training_size(model_name_or_path) or DEFAULT_MAP_SIZE
    return max(patch_size, size - size % patch_size)


def load_demo(args: argparse.Namespace, settings: DemoSettings):
    """The page for the options of `parse_args` and their checked `settings`, with its model loaded."""
    segmenter = load_segmenter(args)
    settings.map_size = resolve_map_size(settings.map_size, args.model, segmenter.vision_model.patch_size)
    return build_demo(segmenter, settings, title=f"DeCLIP: {args.model}")


def require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('The demo needs Gradio: pip install "declip-hf[demo]"') from None


@exits_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)  # flag mistakes first, whether or not Gradio is installed
    require_gradio()
    load_demo(args, settings).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
