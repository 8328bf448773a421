"""Model cards for DeCLIP releases (DeCLIP, CVPR 2025, arXiv 2505.04410), built with huggingface_hub's ModelCard.

Everything the card says about training is read from the run's `training_args.json`, and everything about
evaluation from a `declip_hf.evaluate` results file, so a card cannot drift from the run it describes.
"""

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_cards" / "declip_vision_model_card.md"
REQUIRED_TAGS = ("custom_code", "declip", "clip", "open-vocabulary", "dense-prediction")
PIPELINE_TAG = "image-feature-extraction"

# Licences of the CLIP families a DeCLIP student starts from; anything else must be given with --license.
BASE_MODEL_LICENSES = {"openai/clip-vit-": "mit", "laion/CLIP-ViT-": "mit"}

# Paper (section 7 of the method notes): training-free segmentation mIoU of DeCLIP ViT-B/16 (EVA02-CLIP start).
PAPER_SEGMENTATION_MIOU = {
    "VOC21": 59.7,
    "PC60": 35.3,
    "Object": 36.4,
    "VOC20": 85.0,
    "City": 32.8,
    "PC59": 39.2,
    "ADE": 21.9,
    "Stuff": 25.3,
}
# Names an evaluation may use for the eight benchmarks, lower-cased with separators removed.
_BENCHMARK_ALIASES = {
    "VOC21": ("voc21", "voc", "pascalvoc21", "pascalvoc", "vocwithbackground"),
    "PC60": ("pc60", "context60", "pascalcontext60", "pascalcontext"),
    "Object": ("object", "cocoobject", "objects"),
    "VOC20": ("voc20", "pascalvoc20", "vocnobackground"),
    "City": ("city", "cityscapes"),
    "PC59": ("pc59", "context59", "pascalcontext59"),
    "ADE": ("ade", "ade20k", "ade150", "ade20k150"),
    "Stuff": ("stuff", "cocostuff", "cocostuff171", "stuff171"),
}


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
    if not isinstance(value, str) or Path(value).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        return None
    return value


def default_license(base_model: str | None) -> str | None:
    return next(
        (lic for prefix, lic in BASE_MODEL_LICENSES.items() if base_model and base_model.startswith(prefix)), None
    )


def has_segmentation_api() -> bool:
    return importlib.util.find_spec("declip_hf.segmentation") is not None


def load_results(path: str | Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path is not None else None


def paper_benchmark(name: str) -> str | None:
    """The paper's name for an evaluation benchmark name, if it is one of the eight."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return next((paper for paper, aliases in _BENCHMARK_ALIASES.items() if key in aliases), None)


def _number(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def segmentation_rows(results: dict | None) -> list[dict]:
    rows = []
    for name, metrics in ((results or {}).get("benchmarks") or {}).items():
        paper = PAPER_SEGMENTATION_MIOU.get(paper_benchmark(name) or "")
        rows.append(
            {
                "name": name,
                **{metric: _number(metrics.get(metric)) for metric in ("mIoU", "aAcc", "mAcc")},
                "num_images": metrics.get("num_images", "-"),
                "paper": _number(paper, 1),
            }
        )
    return rows


def region_rows(results: dict | None) -> list[dict]:
    rows = []
    for name, metrics in ((results or {}).get("region_classification") or {}).items():
        box, mask = metrics.get("box") or {}, metrics.get("mask") or {}
        rows.append(
            {
                "name": name,
                "box_thing": _number(box.get("thing_mAcc")),
                "box_stuff": _number(box.get("stuff_mAcc")),
                "mask_thing": _number(mask.get("thing_mAcc")),
                "mask_stuff": _number(mask.get("stuff_mAcc")),
                "num_regions": metrics.get("num_regions", "-"),
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
    return (
        f"{config['num_hidden_layers']} layers, width {config['hidden_size']}, patch {config['patch_size']}, "
        f"{config['image_size']} px, projection {config['projection_dim']}, `{config['hidden_act']}`"
    )


def _processor_size(model_dir: Path) -> str:
    """The side the saved image processor crops to (the training resolution in distill's runs)."""
    path = model_dir / "preprocessor_config.json"
    processor = json.loads(path.read_text()) if path.is_file() else {}
    side = (processor.get("crop_size") or {}).get("height") or (processor.get("size") or {}).get("shortest_edge")
    return f"{side} px" if side else "its configured size"


def _protocol_text(protocol) -> str | None:
    if protocol is None or isinstance(protocol, str):
        return protocol
    return _table_value(protocol)


def _link(name: str, hub_section: str = "") -> str:
    """A Hub link for a Hub id (`hub_section` "datasets/" for datasets), the name as code otherwise."""
    hub_id = hub_id_or_none(name)
    return f"[{hub_id}](https://huggingface.co/{hub_section}{hub_id})" if hub_id else f"`{name}`"


def build_model_card(
    run: TrainingRun,
    repo_id: str,
    license: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    results: dict | None = None,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """The card of `run` released as `repo_id`; `base_model` and `datasets` default to the run's own when they
    are Hub ids."""
    config = json.loads((run.model_dir / "config.json").read_text())
    args = run.args
    base_model = base_model or hub_id_or_none(args.get("student"))
    datasets = datasets or [dataset for dataset in [hub_id_or_none(args.get("dataset"))] if dataset]
    student_size = args.get("student_size")
    return ModelCard.from_template(
        card_data(repo_id, license, base_model, datasets, results),
        template_path=str(template_path),
        repo_id=repo_id,
        student_link=_link(base_model or str(args.get("student", "CLIP"))),
        vfm=_link(str(args.get("vfm", "a vision foundation model"))),
        dataset=_link(str(args.get("dataset", "unrecorded data")), hub_section="datasets/"),
        decoupled_attention=config["decoupled_attention"],
        architecture=_describe_architecture(config),
        patch_size=config["patch_size"],
        training_resolution=f"{student_size} px" if student_size else "the resolution recorded below",
        processor_size=_processor_size(run.model_dir),
        has_text_encoder=(run.model_dir / "text_encoder" / "config.json").is_file(),
        has_segmentation=has_segmentation_api() and (run.model_dir / "text_encoder" / "config.json").is_file(),
        command=run.command,
        hyperparameters=[(name, _table_value(value)) for name, value in args.items()],
        summary=_summary_rows(run.summary),
        versions=", ".join(f"{name} {version}" for name, version in run.versions.items()),
        protocol=_protocol_text((results or {}).get("protocol")),
        segmentation_rows=segmentation_rows(results),
        region_rows=region_rows(results),
    )
