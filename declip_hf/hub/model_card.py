"""Model cards for DeCLIP releases (DeCLIP, CVPR 2025, arXiv 2505.04410), built with huggingface_hub's ModelCard.

Everything the card says about training is read from the run's `training_args.json`, and everything about
evaluation from a `declip-evaluate` results file, so a card cannot drift from the run it describes.
"""

import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models.loading_utils import TEXT_ENCODER_SUBFOLDER
from ..models.preprocessing import TRAINING_SIZE_FIELD
from .convert_open_clip_to_hf import OPEN_CLIP_ARCHITECTURES, VisionShape, check_shape, expected_vision_shape

# Where the source lives, for the card's install line; the same URL as pyproject.toml's [project.urls] (a test
# keeps them equal).
PROJECT_URL = "https://github.com/declip-hf/declip-hf"
TEMPLATE_NAME = "declip_vision_model_card.md"
# The template lives in the repository's model_cards/; pyproject.toml ships that folder inside the package as
# `declip_hf/hub/model_cards/`, so an installed package finds it there and a source checkout here.
PACKAGED_TEMPLATE = resources.files("declip_hf.hub") / "model_cards" / TEMPLATE_NAME
SOURCE_TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME
REQUIRED_TAGS = ("custom_code", "declip", "clip", "open-vocabulary", "dense-prediction")
PIPELINE_TAG = "image-feature-extraction"

# Vision towers of the CLIPs a release may name as its base model, by Hub id: open_clip architecture names, whose
# shapes `convert_open_clip_to_hf` knows. A release naming one of them must have its architecture.
KNOWN_BASE_ARCHITECTURES = {
    "openai/clip-vit-base-patch16": "ViT-B-16",
    "openai/clip-vit-base-patch32": "ViT-B-32",
    "openai/clip-vit-large-patch14": "ViT-L-14",
    "openai/clip-vit-large-patch14-336": "ViT-L-14-336",
}

# Licences of the CLIP families a DeCLIP student starts from; anything else must be given with --license.
# EVA-CLIP (QuanSun/EVA-CLIP, the EVA02 students' start) is MIT; the DeCLIP authors' EVA02 checkpoints
# (xiaomoguhzz/DeCLIP_*) come from their repository, whose LICENSE is Apache-2.0.
BASE_MODEL_LICENSES = {
    "openai/clip-vit-": "mit",
    "laion/CLIP-ViT-": "mit",
    "QuanSun/EVA-CLIP": "mit",
    "xiaomoguhzz/DeCLIP": "apache-2.0",
}
# The EVA02-CLIP-B/16 shape (docs/method.md §8), whose releases the paper's EVA02 region numbers apply to.
EVA02_B16_SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "patch_size": 16}
EVA_MODEL_TYPE = "declip_eva_vision_model"

# Paper (docs/method.md §7): training-free segmentation mIoU of DeCLIP ViT-B/16 (EVA02-CLIP start),
# keyed by the built-in benchmark names of `declip_hf.segmentation.benchmarks.SEGMENTATION_BENCHMARKS`, in the paper's
# column order.
PAPER_SEGMENTATION_MIOU = {
    "voc21": 59.7,
    "context60": 35.3,
    "coco_object": 36.4,
    "voc20": 85.0,
    "cityscapes": 32.8,
    "context59": 39.2,
    "ade20k": 21.9,
    "coco_stuff": 25.3,
}
# Averages over the eight benchmarks as the paper reports them (baselines give only the average).
PAPER_SEGMENTATION_AVERAGE_MIOU = {"DeCLIP": 41.9, "SCLIP": 38.2, "ClearCLIP": 38.1, "CLIP-DINOiser": 40.3}


@dataclass(frozen=True)
class RegionReference:
    """A published region-classification result (box pooling, thing / stuff mAcc in %) and where it applies."""

    benchmark: str
    base_model: str
    image_size: int
    box_thing_mAcc: float
    box_stuff_mAcc: float

    # The region protocol of declip_hf.segmentation.region_protocols the paper's numbers follow.
    protocol: str = "authors"

    def applies_to(self, benchmark: str, base_model: str | None, settings: dict) -> bool:
        found = (benchmark, base_model, settings.get("image_size"), settings.get("protocol"))
        return found == (self.benchmark, self.base_model, self.image_size, self.protocol)

    def __str__(self) -> str:
        return f"{self.box_thing_mAcc:.1f} / {self.box_stuff_mAcc:.1f}"


# Paper appendix: DeCLIP ViT-B/16 on COCO panoptic val2017 at 560 px, started from OpenAI CLIP (the only start this
# package converts) and from EVA02-CLIP (the paper's headline backbone).
PAPER_REGION_OPENAI = RegionReference("coco_panoptic", "openai/clip-vit-base-patch16", 560, 65.0, 38.8)
PAPER_REGION_EVA02 = RegionReference("coco_panoptic", "EVA02-CLIP-B/16", 560, 72.2, 51.3)


@dataclass
class TrainingRun:
    """A training run directory as `training/distill.py` writes it."""

    name: str
    model_dir: Path
    command: str
    args: dict
    summary: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> "TrainingRun":
        run_dir = Path(run_dir)
        args_file = run_dir / "training_args.json"
        if not args_file.is_file():
            raise FileNotFoundError(
                f"{args_file} is missing: RUN_DIR must be a training run (training/distill.py output)."
            )
        if not (run_dir / "model" / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir / 'model'} holds no saved model (config.json missing).")
        recorded = json.loads(args_file.read_text())
        return cls(
            name=run_dir.resolve().name,
            model_dir=run_dir / "model",
            command=recorded["command"],
            args=recorded["args"],
            summary=recorded.get("summary", {}),
            versions=recorded.get("versions", {}),
        )


def hub_id_or_none(value) -> str | None:
    """`value` when it names a Hub repository (`org/name`), None for local paths and anything else."""
    # Hub owners and names start with a letter, digit or `_`: `./x`, `../x` and the card's `.../x` are paths.
    if not isinstance(value, str) or Path(value).exists() or not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", value):
        return None
    return value


def default_license(base_model: str | None) -> str | None:
    return next(
        (lic for prefix, lic in BASE_MODEL_LICENSES.items() if base_model and base_model.startswith(prefix)), None
    )


def load_results(path: str | Path | None) -> dict | None:
    """A `declip-evaluate` results file (None for none); errors name the file and what it should be."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist (pass the JSON `declip-evaluate` wrote).")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"results file {path} is not JSON ({error}); pass the file `declip-evaluate` wrote."
        ) from error
    if not isinstance(results, dict):
        raise ValueError(
            f"results file {path} holds a JSON {type(results).__name__}, not the object `declip-evaluate` writes."
        )
    return results


def _number(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _paper_protocol(settings: dict) -> bool:
    """The settings of DeCLIP's own segmentation protocol, which the paper's numbers use: the `declip` preset (results
    files written before presets existed record none and used it) without PAMR."""
    return settings.get("protocol", "declip") == "declip" and not settings.get("pamr_steps")


def segmentation_rows(results: dict | None) -> list[dict]:
    """One row per segmentation benchmark; the paper's number only for a built-in benchmark under DeCLIP's protocol
    (a peer's preset, PAMR or a custom spec measure something else)."""
    rows = []
    for name, metrics in ((results or {}).get("benchmarks") or {}).items():
        paper = PAPER_SEGMENTATION_MIOU.get(name) if _paper_protocol(metrics.get("settings") or {}) else None
        rows.append(
            {
                "name": name,
                **{metric: _number(metrics.get(metric)) for metric in ("mIoU", "aAcc", "mAcc")},
                "num_images": metrics.get("num_images", "-"),
                "paper": _number(paper, 1),
            }
        )
    return rows


def paper_region_reference(config: dict | None, base_model: str | None) -> tuple[RegionReference, str | None]:
    """The paper's region result a release compares with, and the release's start as that reference names it: the
    EVA02 number for an EVA02-CLIP-B/16 model, else the OpenAI one (which applies only to an OpenAI ViT-B/16 start)."""
    config = config or {}
    if config.get("model_type") == EVA_MODEL_TYPE:
        is_b16 = all(config.get(key) == value for key, value in EVA02_B16_SHAPE.items())
        return PAPER_REGION_EVA02, PAPER_REGION_EVA02.base_model if is_b16 else None
    return PAPER_REGION_OPENAI, base_model


def region_rows(results: dict | None, base_model: str | None, config: dict | None = None) -> list[dict]:
    """One row per region benchmark; the paper's number only where benchmark, starting CLIP (an EVA02-CLIP-B/16
    model for the EVA02 number, per `config`), resolution and region protocol (the authors') match."""
    reference, start = paper_region_reference(config, base_model)
    rows = []
    for name, metrics in ((results or {}).get("region_classification") or {}).items():
        box, mask = metrics.get("box") or {}, metrics.get("mask") or {}
        applies = reference.applies_to(name, start, metrics.get("settings") or {})
        rows.append(
            {
                "name": name,
                "box_thing": _number(box.get("thing_mAcc")),
                "box_stuff": _number(box.get("stuff_mAcc")),
                "mask_thing": _number(mask.get("thing_mAcc")),
                "mask_stuff": _number(mask.get("stuff_mAcc")),
                "num_regions": metrics.get("num_regions", "-"),
                "paper": str(reference) if applies else "n/a",
            }
        )
    return rows


def eval_results(results: dict | None) -> list[EvalResult]:
    """The results as model-index entries: mIoU per segmentation benchmark, mAcc per region benchmark."""
    entries = []
    for name, metrics in ((results or {}).get("benchmarks") or {}).items():
        if isinstance(metrics.get("mIoU"), (int, float)):
            entries.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Zero-shot semantic segmentation",
                    dataset_type=name,
                    dataset_name=name,
                    metric_type="mIoU",
                    metric_name="mIoU",
                    metric_value=float(metrics["mIoU"]),
                )
            )
    for name, metrics in ((results or {}).get("region_classification") or {}).items():
        for pooling in ("box", "mask"):
            for group in ("thing", "stuff"):
                value = (metrics.get(pooling) or {}).get(f"{group}_mAcc")
                if isinstance(value, (int, float)):
                    entries.append(
                        EvalResult(
                            task_type="image-classification",
                            task_name="Zero-shot region classification",
                            dataset_type=name,
                            dataset_name=name,
                            metric_type="accuracy",
                            metric_name=f"{group} mAcc ({pooling})",
                            metric_value=float(value),
                        )
                    )
    return entries


def card_data(
    repo_id: str, license: str, base_model: str | None, datasets: list[str], results: dict | None
) -> ModelCardData:
    extra = {"base_model_relation": "finetune"} if base_model else {}
    return ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        base_model=base_model,
        datasets=datasets or None,
        tags=list(REQUIRED_TAGS),
        eval_results=eval_results(results) or None,
        **extra,
    )


def _table_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    # A `|` would end the table cell and a backtick the code span.
    return text.replace("|", "\\|").replace("`", "'")


def _rounded(value):
    """Floats to 6 significant digits, inside dicts and lists too: summaries hold raw loss and time values."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return [_rounded(item) for item in value] if isinstance(value, list) else value


def _summary_rows(summary: dict) -> list[tuple[str, str]]:
    return [(name.replace("_", " "), _table_value(_rounded(value))) for name, value in summary.items()]


def _describe_architecture(config: dict) -> str:
    if config.get("model_type") == EVA_MODEL_TYPE:
        return (
            f"EVA02-CLIP: {config['num_hidden_layers']} layers, width {config['hidden_size']}, patch "
            f"{config['patch_size']}, {config['image_size']} px, projection {config['projection_dim']}, SwiGLU MLP, "
            "2-D rotary embedding"
        )
    return (
        f"{config['num_hidden_layers']} layers, width {config['hidden_size']}, patch {config['patch_size']}, "
        f"{config['image_size']} px, projection {config['projection_dim']}, `{config['hidden_act']}`"
    )


def card_template() -> str:
    """The card template's text, from the installed package or, in a source checkout, the repository."""
    for template in (PACKAGED_TEMPLATE, SOURCE_TEMPLATE):
        if template.is_file():
            return template.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"The model card template {TEMPLATE_NAME} is neither in the installed package ({PACKAGED_TEMPLATE}) nor in "
        f"a source checkout ({SOURCE_TEMPLATE}): reinstall declip-hf."
    )


def check_base_model(base_model: str | None, config: dict) -> None:
    """Refuse a known base model (`KNOWN_BASE_ARCHITECTURES`) whose vision tower is not the model's architecture."""
    architecture = KNOWN_BASE_ARCHITECTURES.get(base_model)
    if architecture is None:
        return
    found = VisionShape(
        width=config["hidden_size"],
        layers=config["num_hidden_layers"],
        mlp_width=config["intermediate_size"],
        patch_size=config["patch_size"],
        image_size=config["image_size"],
        embed_dim=config["projection_dim"],
    )
    try:
        check_shape(found, expected_vision_shape(OPEN_CLIP_ARCHITECTURES[architecture]), "vision")
    except ValueError as error:
        raise ValueError(
            f"The base model {base_model} is a {architecture} CLIP, but this model is not ({error}). Name the CLIP "
            "the run started from with --base-model, or leave it out."
        ) from error


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or Path(value).is_absolute()


def _hide_path(path: str) -> str:
    """A local path as the card shows it: its last component only (no user names, home or mount points)."""
    return f".../{Path(path).name}" if Path(path).name else "..."


def public_replacements(args: dict, base_model: str | None, datasets: list[str]) -> dict[str, str]:
    """Recorded argument values and what the card shows instead: the student as `base_model` and the dataset as
    `datasets` when those are given, any other local path by its last component."""
    replacements = {}
    if base_model and isinstance(args.get("student"), str):
        replacements[args["student"]] = base_model
    if datasets and isinstance(args.get("dataset"), str):
        replacements[args["dataset"]] = ",".join(datasets)
    for value in args.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item not in replacements and _is_local_path(item):
                replacements[item] = _hide_path(item)
    return {raw: shown for raw, shown in replacements.items() if raw != shown}


def public_value(value, replacements: dict[str, str]):
    if isinstance(value, list):
        return [public_value(item, replacements) for item in value]
    return replacements.get(value, value) if isinstance(value, str) else value


def public_command(command: str, replacements: dict[str, str]) -> str:
    """The recorded command (a `shlex.join`ed line) with each argument, or the value of a `--flag=value`, replaced
    as `public_value` does and any other local path (the script's, a config file's) shortened."""
    try:
        tokens = shlex.split(command)
    except ValueError:  # not a shell line (unbalanced quotes): whitespace-separated words
        tokens = command.split()

    def public_token(token: str) -> str:
        flag, equals, value = token.partition("=")
        if not (token.startswith("-") and equals):
            flag, equals, value = "", "", token
        shown = replacements.get(value, _hide_path(value) if _is_local_path(value) else value)
        return flag + equals + shown

    return shlex.join(public_token(token) for token in tokens)


def _training_size(model_dir: Path, args: dict) -> int | None:
    """The training resolution: recorded by the saved image processor, else the run's `student_size`."""
    path = model_dir / "preprocessor_config.json"
    processor = json.loads(path.read_text()) if path.is_file() else {}
    return processor.get(TRAINING_SIZE_FIELD) or args.get("student_size")


def context_teachers_text(args: dict, replacements: dict[str, str]) -> str:
    """The recorded `--vfm`: one model, or an ensemble (a list, with its `--vfm_weights`), as links."""
    teachers = args.get("vfm", "a vision foundation model")
    if teachers is None:  # --ablation clipself: no context teacher
        return "none"
    if not isinstance(teachers, list):
        return _link(public_value(str(teachers), replacements))
    weights = args.get("vfm_weights") or [None] * len(teachers)
    return " and ".join(
        _link(public_value(str(teacher), replacements)) + (f" (weight {weight:g})" if weight is not None else "")
        for teacher, weight in zip(teachers, weights)
    )


def _link(name: str, hub_section: str = "") -> str:
    """A Hub link for a Hub id (`hub_section` "datasets/" for datasets), the name as code otherwise."""
    hub_id = hub_id_or_none(name)
    return f"[{hub_id}](https://huggingface.co/{hub_section}{hub_id})" if hub_id else f"`{name}`"


def paper_segmentation_table() -> list[list[str]]:
    """The paper's training-free segmentation table: a header row, then one row per method."""
    header = ["training-free segmentation (mIoU)", *PAPER_SEGMENTATION_MIOU, "average"]
    declip = [_number(value, 1) for value in PAPER_SEGMENTATION_MIOU.values()]
    rows = [["DeCLIP", *declip, _number(PAPER_SEGMENTATION_AVERAGE_MIOU["DeCLIP"], 1)]]
    rows += [
        [method, *[""] * len(PAPER_SEGMENTATION_MIOU), _number(average, 1)]
        for method, average in PAPER_SEGMENTATION_AVERAGE_MIOU.items()
        if method != "DeCLIP"
    ]
    return [header, *rows]


def build_model_card(
    run: TrainingRun,
    repo_id: str,
    license: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    results: dict | None = None,
    template: str | None = None,
    analysis: dict | None = None,
) -> ModelCard:
    """The card of `run` released as `repo_id`; `base_model` and `datasets` default to the run's own when they
    are Hub ids, and replace the run's recorded (local) student and dataset wherever the card shows them.
    `template` is the template's text (default: `card_template()`). `analysis` is what
    `declip_hf.analyze.release_analysis` returns (figure file, proxy-token scores), or None for no analysis section."""
    config = json.loads((run.model_dir / "config.json").read_text())
    args = run.args
    base_model = base_model or hub_id_or_none(args.get("student"))
    check_base_model(base_model, config)
    datasets = datasets or [dataset for dataset in [hub_id_or_none(args.get("dataset"))] if dataset]
    replacements = public_replacements(args, base_model, datasets)
    training_size = _training_size(run.model_dir, args)
    recorded_dataset = public_value(str(args.get("dataset", "unrecorded data")), replacements)
    return ModelCard.from_template(
        card_data(repo_id, license, base_model, datasets, results),
        template_str=template if template is not None else card_template(),
        repo_id=repo_id,
        project_url=PROJECT_URL,
        student_link=_link(base_model or public_value(str(args.get("student", "CLIP")), replacements)),
        vfm=context_teachers_text(args, replacements),
        has_context_teacher=args.get("vfm", "") is not None,
        ablation=args.get("ablation") or "none",
        dataset=", ".join(_link(name, hub_section="datasets/") for name in datasets or [recorded_dataset]),
        decoupled_attention=config["decoupled_attention"],
        architecture=_describe_architecture(config),
        model_class="DeCLIPEvaVisionModel" if config.get("model_type") == EVA_MODEL_TYPE else "DeCLIPVisionModel",
        patch_size=config["patch_size"],
        image_size=config["image_size"],
        training_resolution=f"{training_size} px" if training_size else "the resolution recorded below",
        text_encoder_subfolder=TEXT_ENCODER_SUBFOLDER,
        has_text_encoder=(run.model_dir / TEXT_ENCODER_SUBFOLDER / "config.json").is_file(),
        command=public_command(run.command, replacements),
        hyperparameters=[(name, _table_value(public_value(value, replacements))) for name, value in args.items()],
        summary=_summary_rows(run.summary),
        versions=", ".join(f"{name} {version}" for name, version in run.versions.items()),
        protocol=(results or {}).get("protocol"),
        segmentation_rows=segmentation_rows(results),
        region_rows=region_rows(results, base_model, config),
        paper_segmentation_table=paper_segmentation_table(),
        paper_region_openai=PAPER_REGION_OPENAI,
        paper_region_eva02=PAPER_REGION_EVA02,
        paper_region_quoted=paper_region_reference(config, base_model)[0],
        analysis=analysis,
    )
