"""Demo: segment one image into the given words with DeCLIP and save a colour overlay with a legend.

    declip-segment street.jpg --labels "road,car;vehicle,person,sky" --out overlay.png --model PATH_OR_ID

--model is any compatible checkpoint: a DeCLIP model you trained or released (local folder or Hub id), or a plain
CLIP such as openai/clip-vit-base-patch16 for the baseline. The image, labels, settings and output path are
checked before the model loads; a mistake ends with one `error: ...` line and exit status 2.
"""

import argparse
import colorsys
import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .cli import add_model_arguments, check_model_arguments, exits_on_user_error, flag, load_segmenter, make_parser
from .segmenter import check_inference_settings, split_class_names

# Distinct, saturated colours for the first classes (Tableau 10), then evenly spaced hues.
_BASE_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
UNLABELLED = -1


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    extra = num_classes - len(_BASE_PALETTE)
    hues = [colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.95) for index in range(max(extra, 0))]
    return list(_BASE_PALETTE[:num_classes]) + [tuple(round(channel * 255) for channel in hue) for hue in hues]


def colour_overlay(image: Image.Image, label_map: torch.Tensor, colours, opacity: float = 0.55) -> Image.Image:
    """Blend one colour per class over the image; pixels labelled UNLABELLED keep the image."""
    colour_table = torch.tensor(colours + [(0, 0, 0)], dtype=torch.uint8)  # the last row serves UNLABELLED
    indices = torch.where(label_map == UNLABELLED, len(colours), label_map)
    colour_layer = Image.fromarray(colour_table[indices].numpy())
    blended = Image.blend(image.convert("RGB"), colour_layer, opacity)
    blended.paste(image.convert("RGB"), mask=Image.fromarray((label_map == UNLABELLED).numpy().astype("uint8") * 255))
    return blended


def add_legend(overlay: Image.Image, names: list[str], colours, areas: list[float]) -> Image.Image:
    """Append a legend panel on the right: colour swatch, name and share of the image per class."""
    font = ImageFont.load_default()
    line_height, swatch = 16, 12
    entries = [f"{name} ({area:.0%})" for name, area in zip(names, areas)]
    text_width = max(ImageDraw.Draw(overlay).textlength(entry, font=font) for entry in entries)
    panel_width = int(swatch + 12 + text_width + 8)
    height = max(overlay.height, line_height * len(names) + 8)
    canvas = Image.new("RGB", (overlay.width + panel_width, height), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (entry, colour) in enumerate(zip(entries, colours)):
        left, top = overlay.width + 4, 4 + row * line_height
        draw.rectangle([left, top, left + swatch, top + swatch], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((left + swatch + 6, top), entry, fill=(0, 0, 0), font=font)
    return canvas


def legend_overlay(image: Image.Image, label_map: torch.Tensor, class_names) -> tuple[Image.Image, list, list]:
    """The image with one colour per class and a legend; also each class's display name and share of the image."""
    colours = palette(len(class_names))
    areas = [(label_map == index).float().mean().item() for index in range(len(class_names))]
    names = [" / ".join(names) for names in split_class_names(class_names)]
    return add_legend(colour_overlay(image, label_map, colours), names, colours, areas), names, areas


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("image", help="Input image file.")
    parser.add_argument("--labels", required=True,
                        help='Comma-separated classes; names of one class separated by ";" (e.g. "car;vehicle").')
    parser.add_argument("--out", default="overlay.png", help="Output image (PNG advised): the overlay with a legend.")
    add_model_arguments(parser)
    parser.add_argument("--shorter-side", type=int, default=448, help="Resize the shorter image side to this.")
    parser.add_argument("--window", type=int, default=336, help="Sliding-window size in pixels.")
    parser.add_argument("--stride", type=int, default=112, help="Sliding-window stride in pixels (<= --window).")
    parser.add_argument("--logit-scale", type=float, default=40.0,
                        help="Scale of the cosine similarities before the softmax.")
    parser.add_argument("--min-probability", type=float, default=None,
                        help="Leave pixels whose best class probability is below this uncoloured.")
    return parser.parse_args(argv)


def read_image(path: str | Path) -> Image.Image:
    """The RGB image at `path`, decoded in full now, so a bad file fails before the model loads."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read the image {str(path)!r}: {error}") from None


def check_output_path(path: str) -> None:
    """`--out` must name a writable file in an existing folder, with an image extension PIL can write."""
    if Image.registered_extensions().get(Path(path).suffix.lower()) not in Image.SAVE:
        raise ValueError(f"--out {path!r}: give an image file name PIL can write, such as overlay.png.")
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK) or Path(path).is_dir():
        raise ValueError(f"--out {path!r}: {str(folder)!r} is not a writable folder (create it first).")


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Everything that can be checked before the model loads; returns the class list of --labels."""
    class_names = [entry for entry in args.labels.split(",") if entry.strip()]
    split_class_names(class_names)  # empty, repeated or shared names
    check_inference_settings(shorter_side=args.shorter_side, window=args.window, stride=args.stride,
                             logit_scale=args.logit_scale, spell=flag)
    if args.min_probability is not None and not 0 <= args.min_probability <= 1:
        raise ValueError(f"--min-probability must lie in [0, 1], got {args.min_probability}.")
    check_model_arguments(args)
    check_output_path(args.out)
    return class_names


@exits_on_user_error
def main(argv=None) -> Image.Image:
    args = parse_args(argv)
    class_names = check_arguments(args)
    image = read_image(args.image)
    segmenter = load_segmenter(args)
    output = segmenter(
        [image], class_names, shorter_side=args.shorter_side, window=args.window, stride=args.stride,
        logit_scale=args.logit_scale, return_probabilities=True, windows_per_batch=args.windows_per_batch,
    )
    label_map, probabilities = output.label_maps[0], output.probabilities[0]
    if args.min_probability is not None:
        label_map = torch.where(probabilities.amax(dim=0) < args.min_probability, UNLABELLED, label_map)
    result, names, areas = legend_overlay(image, label_map, class_names)
    result.save(args.out)
    print(f"Wrote {args.out}: " + ", ".join(f"{name} {area:.1%}" for name, area in zip(names, areas)))
    return result


if __name__ == "__main__":
    main()
