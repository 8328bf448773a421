"""See what DeCLIP changes (CVPR 2025, arXiv 2505.04410): attention, proxy-token scores and context correlations of
a checkpoint, optionally beside another one and a VFM, on your images (docs/method.md §1.5).

    python -m declip_hf.analyze photos/ --model org/declip-vitb16 --compare openai/clip-vit-base-patch16 \\
        --vfm facebook/dinov2-base --out analysis/

IMAGES are image files or folders of them. Writes to --out:
  proxy_scores.png                the proxy-token score and row similarity per layer, one line per model
  attention_<model>_<image>.png   layers x queries: each layer's attention of CLS and of the chosen points
  correlation_<image>.png         context correlation of each point, per model and for the VFM (with --vfm)
  scores.json                     the scores per layer, averaged over the images and per image
Figures are drawn for the first --figure-images images; the scores cover all of them. Needs matplotlib
(`pip install "declip-hf[viz]"`).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .analysis import (
    CLS_QUERY,
    DEFAULT_TOP_K,
    DeCLIPModel,
    VFMPatchFeatures,
    analyse_attention,
    attention_map,
    attention_proxy_scores,
    context_feature_maps,
    correlation_map,
    grid_size,
    mean_correlation,
    point_to_patch_index,
)
from .models.configuration_declip import DECOUPLED_ATTENTION_MODES
from .models.loading_utils import image_normalisation, quiet_transformers
from .models.modeling_declip_eva import declip_vision_class
from .models.preprocessing import letterbox, prepare_dense_inputs
from .segmentation.cli import exits_on_user_error, make_parser
from .segmentation.segment import read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_POINTS = "0.5,0.5;0.2,0.25;0.8,0.75"
SCORE_NAMES = ("proxy_score", "top_k_mass", "row_similarity")
SCORE_DEFINITION = (
    "Per layer, for each head and image: the image tokens' attention rows P (each normalised to sum 1, all keys "
    "incl. CLS); r_j = mean_i P[i, j]; top_k_mass = sum of the k largest r_j; proxy_score = (top_k_mass - k/T) / "
    "(1 - k/T) with T = 1 + N tokens (0: uniform, 1: all tokens on the same k); row_similarity = mean cosine of "
    "distinct rows (1: position-independent). Averaged over heads, then images. The last layer is listed twice: "
    "its ordinary attention, then its decoupled one (mode in brackets). See docs/method.md §1.5."
)


@dataclass
class AnalysedModel:
    """A model under analysis: its label in figures, checkpoint, and image statistics."""

    label: str
    checkpoint: str
    model: DeCLIPModel
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pixel_values(self, image: Image.Image, size: int) -> torch.Tensor:
        return prepare_dense_inputs(image, size=size, mean=self.mean, std=self.std).to(self.model.device)


def load_analysed_model(checkpoint: str, mode: str | None, device: str = "cpu") -> AnalysedModel:
    """A DeCLIP or CLIP checkpoint as a `DeCLIPVisionModel`, or an EVA02 DeCLIP one as a `DeCLIPEvaVisionModel` (its
    config decides), in `mode` when given (else the checkpoint's)."""
    overrides = {"decoupled_attention": mode} if mode else {}
    with quiet_transformers():
        model = declip_vision_class(checkpoint).from_pretrained(checkpoint, **overrides).to(device).eval()
    mean, std = image_normalisation(checkpoint)
    label = f"{Path(str(checkpoint).rstrip('/')).name} ({model.config.decoupled_attention})"
    return AnalysedModel(label, str(checkpoint), model, mean, std)


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def image_files(paths: list[str]) -> list[Path]:
    """The image files named, folders expanded to their image files (sorted, not recursive)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(child for child in path.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path} is neither an image file nor a folder.")
    if not files:
        raise ValueError(f"no images found in {', '.join(paths)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def parse_points(text: str) -> list[tuple[float, float]]:
    """`"x,y;x,y"` (normalised to [0, 1], x to the right, y down) -> [(x, y), ...]."""
    try:
        points = [tuple(float(value) for value in item.split(",")) for item in text.split(";") if item.strip()]
    except ValueError:
        points = None
    if not points or any(len(point) != 2 or not all(0 <= v <= 1 for v in point) for point in points):
        raise ValueError(
            f"--points {text!r}: give points as x,y pairs in [0, 1] separated by ';', e.g. 0.5,0.5;0.2,0.8."
        )
    return points


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# --------------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------------


def score_images(
    models: list[AnalysedModel], images: list[Image.Image], size: int, top_k: int = DEFAULT_TOP_K
) -> dict[str, dict]:
    """Per-layer proxy-token scores of each model on each image: {label: {layers, checkpoint, mode, SCORE: {mean,
    per_image}}}. One image at a time, so memory stays that of one forward pass."""
    per_image = {model.label: [] for model in models}
    for image in tqdm(images, desc="proxy-token scores", disable=len(images) < 2):
        for model in models:
            per_image[model.label].append(attention_proxy_scores(
                analyse_attention(model.model, model.pixel_values(image, size)), top_k))
    results = {}
    for model in models:
        scores = per_image[model.label]
        entry = {"checkpoint": model.checkpoint, "decoupled_attention": model.model.config.decoupled_attention,
                 "layers": scores[0].layers, "top_k": top_k}
        for name in SCORE_NAMES:
            values = torch.stack([getattr(score, name) for score in scores])  # (images, layers)
            entry[name] = {"mean": values.mean(0).tolist(), "std": values.std(0, unbiased=False).tolist(),
                           "per_image": values.tolist()}
        results[model.label] = entry
    return results


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or an error that names the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            'The analysis figures need matplotlib: pip install "declip-hf[viz]" (or pip install matplotlib).'
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_proxy_scores(scores: dict[str, dict], path: Path, title: str = "") -> Path:
    """Proxy-token score and row similarity per layer (mean ± std over the images), one line per model."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    panels = (("proxy_score", "proxy-token score (0 uniform, 1 all on k tokens)"),
              ("row_similarity", "row similarity (1 = position-independent)"))
    num_layers = max(len(entry["layers"]) for entry in scores.values()) - 1
    for axis, (name, ylabel) in zip(axes, panels):
        for label, entry in scores.items():
            mean, std = torch.tensor(entry[name]["mean"]), torch.tensor(entry[name]["std"])
            layers = torch.arange(1, len(mean))
            line, = axis.plot(layers, mean[:-1], marker="o", markersize=3, label=label)
            axis.fill_between(layers, (mean - std)[:-1], (mean + std)[:-1], alpha=0.15, color=line.get_color())
            # The decoupled final layer is another reading of the last layer, not a layer after it: a lone star.
            axis.errorbar([num_layers + 1], mean[-1:], yerr=std[-1:], marker="*", markersize=11, color=line.get_color())
        axis.set_xticks(range(1, num_layers + 2), [*map(str, range(1, num_layers + 1)), "decoupled"], fontsize=7)
        axis.set_xlabel("layer (q-k attention); star: the final layer's decoupled attention", fontsize=8)
        axis.set_ylabel(ylabel, fontsize=8)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    top_k = next(iter(scores.values())).get("top_k", DEFAULT_TOP_K)
    figure.suptitle(title or f"Proxy tokens per layer (k = {top_k}; mean ± std over images)", fontsize=10)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _overlay(axis, picture, heat, cmap, vmin, vmax):
    """The picture, in grey so that colour only means the map, with an (h, w) map stretched over it."""
    height, width = picture.size[1], picture.size[0]
    axis.imshow(picture.convert("L"), cmap="gray", vmin=0, vmax=255)
    shown = axis.imshow(heat.cpu().numpy(), cmap=cmap, alpha=0.6, extent=(0, width, height, 0), vmin=vmin,
                        vmax=vmax, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    return shown


def _mark(axis, picture, point):
    axis.plot(point[0] * picture.size[0], point[1] * picture.size[1], marker="x", color="lime", markersize=8, mew=2)


def plot_attention_grid(model: AnalysedModel, image: Image.Image, size: int, points, path: Path, name: str) -> Path:
    """Rows: each layer's q-k attention, then the final layer's decoupled attention; columns: CLS and the points.
    Heads averaged; each map scaled to its own maximum."""
    plt = pyplot()
    analysis = analyse_attention(model.model, model.pixel_values(image, size))
    grid = analysis.grid_size
    picture = letterbox(image, size)
    queries = [(CLS_QUERY, "CLS token", None)] + [
        (point_to_patch_index(x, y, grid), f"point ({x:.2f}, {y:.2f})", (x, y)) for x, y in points
    ]
    rows = [*(f"layer {i + 1}" for i in range(len(analysis.layer_attentions))),
            f"layer {len(analysis.layer_attentions)}\ndecoupled ({analysis.mode})"]
    weights = [*analysis.layer_attentions, analysis.decoupled_attention]
    figure, axes = plt.subplots(len(rows), len(queries), figsize=(1.9 * len(queries), 1.9 * len(rows)),
                                squeeze=False, constrained_layout=True)
    for row, (row_label, layer_weights) in enumerate(zip(rows, weights)):
        for column, (query, title, point) in enumerate(queries):
            axis = axes[row, column]
            heat = attention_map(layer_weights[0], query, grid).mean(0)  # heads averaged: (h, w)
            _overlay(axis, picture, heat, "inferno", 0, float(heat.max()))
            if point:
                _mark(axis, picture, point)
            axes[0, column].set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(row_label, fontsize=8)
    figure.suptitle(f"{model.label}: where each query attends, on {name}\n(heads averaged, each map scaled to its "
                    "maximum; green x = the query)", fontsize=9)
    figure.savefig(path, dpi=70)
    plt.close(figure)
    return path


def plot_correlations(models: list[AnalysedModel], vfm: VFMPatchFeatures | None, image: Image.Image, size: int,
                      points, path: Path, name: str) -> Path:
    """Rows: each model's context correlation, then the VFM's; columns: the points. Cosines on one colour scale."""
    plt = pyplot()
    picture = letterbox(image, size)
    rows = [(model.label + " context", _model_correlation(model, image, size)) for model in models]
    if vfm is not None:
        rows.append((f"{Path(vfm.name).name} (VFM)", _vfm_correlation(vfm, image, size, models[0])))
    figure, axes = plt.subplots(len(rows), len(points), figsize=(2.3 * len(points) + 0.8, 2.2 * len(rows)),
                                squeeze=False, constrained_layout=True)
    for row, (row_label, correlation) in enumerate(rows):
        for column, point in enumerate(points):
            shown = _overlay(axes[row, column], picture, correlation(point), "coolwarm", -1, 1)
            _mark(axes[row, column], picture, point)
            axes[0, column].set_title(f"point ({point[0]:.2f}, {point[1]:.2f})", fontsize=8)
        axes[row, 0].set_ylabel(row_label, fontsize=8)
    figure.colorbar(shown, ax=axes, shrink=0.6, label="cosine with the query patch")
    figure.suptitle(f"Patch correlations on {name} (the context loss aligns the model rows with the VFM's)",
                    fontsize=9)
    figure.savefig(path, dpi=70)
    plt.close(figure)
    return path


def _model_correlation(model: AnalysedModel, image, size):
    """One forward for all the points: point -> the model's context correlation (h, w)."""
    pixel_values = model.pixel_values(image, size)
    grid = grid_size(model.model, pixel_values)
    feature_maps = context_feature_maps(model.model, pixel_values)
    return lambda point: mean_correlation(feature_maps, point_to_patch_index(*point, grid))[0]


def _vfm_correlation(vfm: VFMPatchFeatures, image, size, reference: AnalysedModel):
    """The VFM on the same frame with the model's grid: side = (size / model patch) * VFM patch (docs/method.md §3)."""
    side = size // reference.model.config.patch_size * vfm.patch_size
    mean, std = vfm.normalisation()
    pixel_values = prepare_dense_inputs(image, size=side, mean=mean, std=std).to(vfm.model.device)
    grid = (side // vfm.patch_size,) * 2
    features = vfm(pixel_values)  # one forward for all the points
    return lambda point: correlation_map(features, point_to_patch_index(*point, grid))[0]


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("images", nargs="+", help="Image files or folders of images.")
    parser.add_argument("--model", required=True,
                        help="DeCLIP (CLIP or EVA02 student) or CLIP checkpoint (local folder or Hub id).")
    parser.add_argument("--compare", default=None,
                        help="A second checkpoint to show beside --model (e.g. the CLIP it started from).")
    parser.add_argument("--vfm", default=None,
                        help="VFM checkpoint whose patch correlations are shown beside, read as the context teacher "
                        "is in training: DINOv2 (with or without registers), DINO (ViT) or SAM.")
    parser.add_argument("--out", required=True, help="Folder for the figures and scores.json (created).")
    parser.add_argument("--decoupled-attention", default=None, choices=DECOUPLED_ATTENTION_MODES,
                        help="Mode to read --model's final layer in (unset: the checkpoint's).")
    parser.add_argument("--compare-decoupled-attention", default=None, choices=DECOUPLED_ATTENTION_MODES,
                        help="Mode for --compare (unset: its checkpoint's); --compare = --model with another mode "
                        "compares two modes of one checkpoint.")
    parser.add_argument("--size", type=int, default=None,
                        help="Side of the letterboxed input in px (unset: --model's image_size, CLIP's own input).")
    parser.add_argument("--points", default=DEFAULT_POINTS,
                        help="Query points for the maps, x,y in [0, 1] of the input square, ';'-separated.")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="k of the proxy-token score.")
    parser.add_argument("--figure-images", type=int, default=2,
                        help="Draw attention and correlation figures for this many images (scores use all).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    return parser.parse_args(argv)


def check_size(size: int, models: list[AnalysedModel]) -> int:
    for model in models:
        patch = model.model.config.patch_size
        if size <= 0 or size % patch:
            raise ValueError(f"--size {size} is not a positive multiple of {model.label}'s patch size {patch}.")
    return size


def analyse(models: list[AnalysedModel], images: dict[str, Image.Image], out: Path, size: int, points,
            top_k: int = DEFAULT_TOP_K, vfm: VFMPatchFeatures | None = None, figure_images: int = 2) -> dict:
    """Scores of all images and figures of the first `figure_images`, written to `out`; returns the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    scores = score_images(models, list(images.values()), size, top_k)
    plot_proxy_scores(scores, out / "proxy_scores.png")
    figures = ["proxy_scores.png"]
    for name, image in list(images.items())[:figure_images]:
        stem = slug(Path(name).stem)
        for model in models:
            path = out / f"attention_{slug(model.label)}_{stem}.png"
            figures.append(plot_attention_grid(model, image, size, points, path, name).name)
        path = out / f"correlation_{stem}.png"
        figures.append(plot_correlations(models, vfm, image, size, points, path, name).name)
    report = {"definition": SCORE_DEFINITION, "top_k": top_k, "size": size, "points": points,
              "images": list(images), "vfm": vfm.name if vfm else None, "models": scores, "figures": figures}
    (out / "scores.json").write_text(json.dumps(report, indent=2))
    return report


# --------------------------------------------------------------------------------------------------------------------
# The model card's figure (declip-release --analysis-images)
# --------------------------------------------------------------------------------------------------------------------

CARD_FIGURE = "proxy_scores.png"


def release_analysis(model_dir: Path, model_label: str, compare: str, compare_label: str, image_paths: list[str],
                     out: Path, top_k: int = DEFAULT_TOP_K) -> dict:
    """Proxy-token scores of a released model and the CLIP it started from (read in the released model's mode) on
    sample images: writes `out / CARD_FIGURE` and returns what the card shows."""
    images = [read_image(path) for path in image_files(image_paths)]  # a bad path fails before any model loads
    released = load_analysed_model(str(model_dir), None)
    mode = released.model.config.decoupled_attention
    baseline = load_analysed_model(compare, mode)
    released.label, baseline.label = f"{model_label} ({mode})", f"{compare_label} ({mode})"
    size = check_size(released.model.config.image_size, [released, baseline])
    scores = score_images([baseline, released], images, size, top_k)
    plot_proxy_scores(scores, out / CARD_FIGURE,
                      title=f"Proxy tokens per layer, {compare_label} vs {model_label} "
                      f"({len(images)} sample image(s), k = {top_k}; mean ± std)")
    rows = [{"label": label, "deepest": f"{entry['proxy_score']['mean'][-2]:.3f}",
             "decoupled": f"{entry['proxy_score']['mean'][-1]:.3f}",
             "deepest_similarity": f"{entry['row_similarity']['mean'][-2]:.3f}",
             "decoupled_similarity": f"{entry['row_similarity']['mean'][-1]:.3f}"} for label, entry in scores.items()]
    return {"figure": CARD_FIGURE, "num_images": len(images), "size": size, "top_k": top_k, "mode": mode,
            "rows": rows}


@exits_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    points = parse_points(args.points)
    files = image_files(args.images)
    if args.top_k < 1 or args.figure_images < 0:
        raise ValueError("--top-k must be at least 1 and --figure-images at least 0.")
    try:
        pyplot()  # a missing matplotlib fails before any model loads
    except ImportError as error:
        raise ValueError(str(error)) from None
    images = {}
    for path in files:
        images.setdefault(path.name if path.name not in images else str(path), read_image(path))
    models = [load_analysed_model(args.model, args.decoupled_attention, args.device)]
    if args.compare:
        models.append(load_analysed_model(args.compare, args.compare_decoupled_attention, args.device))
    if len({model.label for model in models}) < len(models):
        models[1].label += " [compare]"
    vfm = VFMPatchFeatures.from_pretrained(args.vfm) if args.vfm else None
    if vfm is not None:
        vfm.model.to(args.device)
    size = check_size(args.size or models[0].model.config.image_size, models)
    report = analyse(models, images, Path(args.out), size, points, args.top_k, vfm, args.figure_images)
    for label, entry in report["models"].items():
        final = entry["proxy_score"]["mean"]
        print(f"{label}: proxy-token score, deepest ordinary layer {final[-2]:.3f}, decoupled final layer "
              f"{final[-1]:.3f}")
    print(f"Wrote {len(report['figures'])} figures and scores.json to {args.out}")
    return report


if __name__ == "__main__":
    main()
