"""DeCLIP distillation with Accelerate (CVPR 2025, arXiv 2505.04410; docs/method.md §3-5).

Turns a CLIP into a DeCLIP: the student's decoupled last layer learns content from the frozen starting CLIP (RoI
features of grid crops vs. the teacher's crop embeddings) and context from frozen vision foundation models (patch
correlations of a DINOv2, DINO or SAM, or a weighted ensemble of them; docs/method.md §9). `--ablation clipself` and
`--ablation coupled` train the paper's two baselines instead (docs/method.md §10).

    accelerate launch training/distill.py --config configs/tiny.yaml
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 \\
        training/distill.py --config configs/declip_vitb16_coco.yaml

On a machine without GPUs, two processes need Accelerate's CPU switch (plain `--num_processes 2` starts one):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/distill.py --config configs/tiny.yaml

Every flag can also be a key of the `--config` YAML file; flags given on the command line win. Outputs go to
`--output_dir` (RUN_DIR): `model/` (the distilled model), `training_args.json`, `logs.jsonl`, `checkpoints/`,
`tensorboard/`. A RUN_DIR belongs to one run: a new run refuses a folder holding another run's outputs unless
given `--overwrite_output_dir`, and a resume refuses a checkpoint whose run had different settings.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`accelerate launch training/distill.py`): import `training.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate
import datasets
import torch
import transformers
import yaml
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

import declip_hf
from declip_hf import (
    TRAINABLE_ATTENTION_MODES,
    DeCLIPDenseOutput,
    DeCLIPEvaVisionConfig,
    DeCLIPVisionConfig,
    DeCLIPVisionModel,
)
from declip_hf.models.loading_utils import image_normalisation, quiet_transformers
from declip_hf.models.modeling_declip_eva import declip_vision_class
from declip_hf.vfm import vfm_normalisation, vfm_patch_size
from training.checkpointing import (
    RUN_IDENTITY_KEY,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    write_file_atomically,
)
from training.collectives import FailedOnEveryProcess, failure_of, first_failure
from training.data import (
    ImageViewsDataset,
    StreamPosition,
    batches_in_step,
    make_dataloader,
    open_image_stream,
    shard_for_process,
    sharding_warning,
)
from training.evaluation import TrainingEvaluator, add_evaluation_arguments, evaluation_specs
from training.export import save_model
from training.losses import TRAINING_SCHEMES, DeCLIPLoss, TrainingScheme, decoupled_context
from training.optim import LR_SCALINGS, build_optimizer, build_scheduler, configure_trainable, scaled_learning_rate
from training.optim import total_update_steps
from training.progress import EpochImageCounts, TrainingProgress
from training.run_folder import claim_output_dir, resumable_args
from training.teachers import ContextTeachers, FrozenCLIPTeacher, FrozenVFM
from training.tiny_assets import make_tiny_assets
from training.views import ViewConfig, VFMView

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# OpenAI-style CLIP towers, and EVA02-CLIP ones (docs/method.md §8; e.g. a converted DeCLIP authors' checkpoint).
STUDENT_MODEL_TYPES = ("clip", "clip_vision_model", DeCLIPVisionConfig.model_type, DeCLIPEvaVisionConfig.model_type)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


class TrainingFailed(RuntimeError):
    """The run cannot go on (diverged, no usable data, disk full); the message says why and what to do."""


class ModelSaveFailed(TrainingFailed, FailedOnEveryProcess):
    """The final model folder could not be written (on the main process); raised on every process."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` shows every default that is set and keeps the description's layout (its example commands)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Errors are one line on stderr (exit code 2), printed by one process only: no usage block to scroll past,
    and not once per process under `accelerate launch`."""

    def error(self, message: str):
        if is_first_process():
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        self.exit(2)


def is_first_process() -> bool:
    """Rank 0 as the launcher numbers processes (known before Accelerate starts)."""
    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="distill.py", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    flag = argparse.BooleanOptionalAction
    add("--config", help="YAML file whose keys are these flags' names (without --); command-line flags override it.")
    add("--make_tiny_assets", metavar="DIR", help="Write tiny random CLIP/DINOv2/DINO/SAM checkpoints (DIR/clip, "
        "DIR/dinov2, DIR/dino, DIR/sam) and generated parquet images (DIR/images) there if DIR does not exist yet; "
        "for the built-in demo config.")
    # Models
    add("--student", help="The CLIP to distil: Hub id or folder of a CLIPModel, CLIPVisionModelWithProjection or "
        "DeCLIP checkpoint (e.g. openai/clip-vit-base-patch16). Also the frozen content teacher.")
    add("--vfm", nargs="+", help="The frozen context teacher(s) (docs/method.md §9): Hub ids or folders of a DINOv2 "
        "with or without registers (facebook/dinov2-base), a DINO ViTModel (facebook/dino-vitb16) or a SAM "
        "(facebook/sam-vit-base). Several: the context loss is their weighted sum (see --vfm_weights).")
    add("--vfm_weights", nargs="+", type=float, help="One weight >= 0 per --vfm teacher (default: equal weights "
        "summing to 1); the context loss is sum_i w_i L_context,i, each term logged as loss/context/<name>.")
    add("--ablation", default="none", choices=tuple(TRAINING_SCHEMES), help="none: DeCLIP. The paper's baselines "
        "(docs/method.md §10): clipself (content loss only on the maskclip path, no VFM; --vfm is ignored) or "
        "coupled (the vanilla path, the context loss on the same projected dense tokens). Sets the student's path.")
    add("--decoupled_attention", choices=TRAINABLE_ATTENTION_MODES, help="The decoupled last layer's attention "
        "(docs/method.md §1): qq, kk, vv, csa (qq + kk weights) or all (default: qq). An --ablation sets its own.")
    add("--frozen_dtype", default="float32", choices=tuple(FROZEN_DTYPES),
        help="Precision of the frozen teacher and VFM weights (bfloat16/float16 halve their memory).")
    # Data
    add("--dataset", help="Images to train on, streamed: a Hub dataset id, a local image folder, parquet files "
        "(folder, file or glob) or webdataset .tar shards.")
    add("--data_files", help="Optional data_files pattern within a Hub dataset (passed to datasets.load_dataset).")
    add("--split", default="train", help="Dataset split.")
    add("--image_column", default="image", help="Column holding the images.")
    add("--shuffle_buffer", type=int, default=1000, help="Size of the streaming shuffle buffer (0: no shuffle).")
    add("--shuffle_input_shards", type=int, default=10, help="Shards feeding the shuffle buffer at a time: more mix "
        "better; with several parquet shards, datasets then pauses 5 s after each pass (1 avoids it, for tiny runs).")
    add("--images_per_epoch", type=int, help="Images in one epoch, to size the schedule when --max_steps is not "
        "given and the dataset does not declare its size (e.g. 118287 for COCO train2017).")
    add("--dataloader_num_workers", type=int, default=2, help="Dataloader worker processes per training process.")
    # Views (docs/method.md §3)
    add("--student_size", type=int, default=560, help="Side of the square student view; a multiple of the "
        "student's patch size. The VFM view gets the same patch grid.")
    add("--teacher_size", type=int, help="Side of the teacher's crops (default: the checkpoint's image size, 224).")
    add("--max_split", type=int, default=6, help="Largest number of grid rows/columns for the crops.")
    add("--max_crops", type=int, default=20, help="Crops kept per image.")
    # Losses (docs/method.md §4)
    add("--content_weight", type=float, default=1.0, help="Weight of the content (self-distillation) loss.")
    add("--context_weight", type=float, default=0.1, help="Weight of the context (VFM distillation) loss.")
    # Optimisation (docs/method.md §5)
    add("--lr", type=float, default=1e-5, help="Learning rate for a total batch of 16 images (see --lr_scaling).")
    add("--lr_scaling", default="linear", choices=tuple(LR_SCALINGS), help="linear: the lr used is "
        "lr * total_batch / 16, total_batch = per-device batch x processes x accumulation; none: lr as given.")
    add("--weight_decay", type=float, default=0.1, help="AdamW weight decay, on weight matrices only.")
    add("--betas", type=float, nargs=2, default=[0.9, 0.98], help="AdamW betas.")
    add("--eps", type=float, default=1e-6, help="AdamW epsilon.")
    add("--warmup_steps", type=int, default=1000, help="Linear warmup, in optimizer updates; then cosine to 0.")
    add("--epochs", type=int, default=6, help="Passes over the dataset (ignored when --max_steps is given).")
    add("--max_steps", type=int, help="Optimizer updates of the whole run (overrides --epochs; data is cycled).")
    add("--stop_after_steps", type=int, help="End this invocation after this many updates in total (with a "
        "checkpoint), without changing the schedule; resume later with --resume_from_checkpoint latest.")
    add("--per_device_batch_size", type=int, default=2, help="Images per process and forward pass.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Forward passes per optimizer update.")
    add("--num_trainable_layers", type=int, help="Train only the last N encoder layers (default: all, as §5).")
    add("--gradient_checkpointing", action=flag, default=False, help="Recompute encoder activations in the "
        "backward pass: much less memory, a little more time.")
    add("--compile", action=flag, default=False, help="torch.compile the student, the content teacher and the "
        "context teachers (the first steps wait for compilation; numerics equal the eager step's to float rounding).")
    add("--compile_backend", default="inductor", help="torch.compile backend for --compile (e.g. aot_eager to "
        "debug a compilation problem).")
    add("--mixed_precision", choices=("no", "fp16", "bf16"), help="Autocast precision; by default what "
        "`accelerate launch --mixed_precision` / `accelerate config` says.")
    add("--seed", type=int, default=0, help="Seed of the shuffle, the crops and the RNGs.")
    # Outputs
    add("--output_dir", default="outputs/declip", help="RUN_DIR: model/, checkpoints/, logs.jsonl, training_args.json.")
    add("--ensemble_alpha", type=float, default=1.0, help="Saved weights = alpha * student + (1 - alpha) * starting "
        "CLIP (docs/method.md §5; the reference scripts use 0.7); 1.0 saves the student as is.")
    add("--checkpointing_steps", type=int, help="Save a resumable checkpoint every N updates (default: never).")
    add("--checkpoints_total_limit", type=int, default=2, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", help="'latest' (newest completed checkpoint in RUN_DIR/checkpoints, or a fresh "
        "start if there is none) or a checkpoint folder.")
    add("--report_to", default="auto", help="Accelerate trackers: 'auto' (tensorboard when installed), 'none', "
        "'all' or a comma-separated list. RUN_DIR/logs.jsonl is always written.")
    add("--overwrite_output_dir", action=flag, default=False, help="Delete the run outputs (model/, checkpoints/, "
        "logs, ...) already in --output_dir and start afresh. Without it, a folder holding another run is refused.")
    add("--on_nonfinite", default="stop", choices=("stop", "skip"), help="What a non-finite (NaN/inf) loss does: "
        "'stop' ends the run with an error (nothing more is saved); 'skip' drops that update (the optimizer does not "
        "step; the schedule advances), logs a warning and counts it as `nonfinite_updates`.")
    add("--logging_steps", type=int, default=10, help="Log every N updates.")
    add("--log_image_hashes", action=flag, default=False, help="Debug: write a hash of every image each process "
        "trains on to RUN_DIR/debug/image_hashes_rank<r>.txt (to check that processes see disjoint data).")
    add_evaluation_arguments(parser)  # --eval_* (training/evaluation.py)
    return parser


def yaml_to_argv(config: dict, parser: argparse.ArgumentParser) -> list[str]:
    """YAML keys -> command-line tokens, so YAML values are parsed and checked exactly like flags."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    unknown = sorted(set(config) - set(actions) | ({"config"} & set(config)))
    if unknown:
        raise ValueError(f"Unknown keys {unknown} in the config file; valid keys are the flag names: "
                         f"{', '.join(sorted(set(actions) - {'help', 'config'}))}.")
    argv = []
    for key, value in config.items():
        option = f"--{key}"
        if value is None:
            continue
        if isinstance(actions[key], argparse.BooleanOptionalAction):
            argv.append(option if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = parser.parse_known_args(argv)
    config_argv = []
    if known.config:
        try:
            config_argv = yaml_to_argv(read_yaml_config(Path(known.config)), parser)
        except (OSError, ValueError, yaml.YAMLError) as error:
            parser.error(f"--config {known.config}: {error}")
    args = parser.parse_args(config_argv + argv)  # later tokens win: the command line overrides the file
    return resolve_scheme(args)


def resolve_scheme(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in what `--ablation` decides, so that the recorded arguments (and the run identity) say what the run
    trains: the student's path (`decoupled_attention`, also saved in the model's config) and, for clipself, no VFM.
    Settings the ablation overrides are named on stderr."""
    scheme = TRAINING_SCHEMES[args.ablation]
    ignored = []
    if scheme.dense_path is not None:
        if args.decoupled_attention is not None:
            ignored.append(f"--decoupled_attention {args.decoupled_attention}")
        args.decoupled_attention = scheme.dense_path
    elif args.decoupled_attention is None:
        args.decoupled_attention = "qq"
    if not scheme.uses_vfm:
        ignored += [f"--{name} {' '.join(map(str, getattr(args, name)))}" for name in ("vfm", "vfm_weights")
                    if getattr(args, name)]
        args.vfm = args.vfm_weights = None
    # One teacher is recorded as a plain string, as before ensembles existed (resume identity, model cards).
    if args.vfm is not None and len(args.vfm) == 1:
        args.vfm = args.vfm[0]
    if ignored and is_first_process():
        print(f"Note: --ablation {args.ablation} trains the {args.decoupled_attention} path"
              f"{' without a VFM' if not scheme.uses_vfm else ''}; ignoring {', '.join(ignored)}.", file=sys.stderr)
    return args


def vfm_names(args: argparse.Namespace) -> list[str]:
    """The context teachers of the run, in --vfm order (none for the clipself ablation)."""
    if args.vfm is None:
        return []
    return [args.vfm] if isinstance(args.vfm, str) else list(args.vfm)


def teacher_weights(args: argparse.Namespace) -> tuple[float, ...]:
    """--vfm_weights, or equal weights summing to 1."""
    count = len(vfm_names(args))
    if args.vfm_weights is not None:
        return tuple(args.vfm_weights)
    return tuple(1.0 / count for _ in range(count))  # () for the clipself ablation: no context term


def teacher_names(args: argparse.Namespace) -> tuple[str, ...]:
    """Short names of the context teachers for their loss terms: the Hub id's or folder's last part, numbered when
    two share one."""
    names = [Path(name.rstrip("/")).name or name for name in vfm_names(args)]
    return tuple(name if names.count(name) == 1 else f"{name}_{index}" for index, name in enumerate(names))


def read_yaml_config(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"the file must map flag names to values (e.g. `lr: 1.0e-5`, one per line), but it holds "
                         f"a {type(config).__name__}: {str(config)[:60]!r}.")
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Start-up checks: everything that can be wrong with the arguments is found here, from configs, before any model.


@dataclass
class RunPlan:
    """What the checks learnt: the views' geometry and how long the schedule is."""

    view_config: ViewConfig
    images_per_epoch: int | None
    resume_path: Path | None
    vfm_view_keys: list[str]  # the batch key of each context teacher's view, in --vfm order
    evaluation_specs: tuple[list, list]  # (segmentation, region) specs of --eval_every
    stream: object  # the opened image stream (datasets.IterableDataset), opened once for the checks and the run


def check_args(args: argparse.Namespace) -> RunPlan:
    """Raise ValueError with what to change if the arguments cannot make a run."""
    required = ("student", "vfm", "dataset") if TRAINING_SCHEMES[args.ablation].uses_vfm else ("student", "dataset")
    for name in required:
        if not getattr(args, name):
            raise ValueError(f"--{name} is required (on the command line or in the --config file).")
    _check_numbers(args)
    _check_compile_backend(args)
    check_output_dir_usable(Path(args.output_dir))
    resolve_trackers(args.report_to)
    student_config = _read_config(args.student, "--student")
    if student_config.model_type not in STUDENT_MODEL_TYPES:
        raise ValueError(f"--student {args.student!r} is a {student_config.model_type!r} model; give a CLIP "
                         f"checkpoint ({', '.join(STUDENT_MODEL_TYPES)}).")
    student_config = declip_vision_class(args.student).config_class.from_pretrained(args.student)
    vfm_views = [_vfm_view(name) for name in vfm_names(args)]  # also checks each is a supported VFM
    _check_model_numbers(args, student_config)
    view_config, vfm_view_keys = _view_config(args, student_config, vfm_views)
    try:
        stream = open_image_stream(args.dataset, args.split, args.image_column, data_files=args.data_files)
    except OSError as error:  # e.g. a Hub id that cannot be reached
        raise ValueError(f"--dataset {args.dataset!r} (split {args.split!r}) cannot be opened: {error}") from error
    images_per_epoch = args.images_per_epoch or _declared_size(stream, args.split)
    if args.max_steps is None and images_per_epoch is None:
        raise ValueError(f"The size of {args.dataset!r} is unknown while streaming: give --max_steps, or "
                         f"--images_per_epoch with --epochs.")
    return RunPlan(view_config, images_per_epoch, _resume_path(args), vfm_view_keys, evaluation_specs(args), stream)


def _check_compile_backend(args: argparse.Namespace) -> None:
    backends = torch._dynamo.list_backends(exclude_tags=())  # debugging backends such as aot_eager included
    if args.compile_backend not in backends:
        raise ValueError(f"unknown --compile_backend {args.compile_backend!r}; torch.compile knows "
                         f"{', '.join(sorted(backends))}.")


def _resume_path(args: argparse.Namespace) -> Path | None:
    checkpoints_dir = Path(args.output_dir) / "checkpoints"
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        inside = args.resume_from_checkpoint == "latest" or Path(args.output_dir).resolve() in \
            Path(args.resume_from_checkpoint).resolve().parents
        if inside:
            raise ValueError("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint "
                             f"{args.resume_from_checkpoint!r} would resume from; give one of the two.")
    return resolve_resume(args.resume_from_checkpoint, checkpoints_dir)


# A Hub repository id: "name" or "org/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _read_config(name: str, flag: str) -> PretrainedConfig:
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{flag} {name!r} is a folder without config.json: give the folder a model was saved to "
                         f"(`save_pretrained`), or a Hub id.")
    if not path.exists() and (not HUB_ID.match(name) or name.startswith((".", "/", "~"))):
        raise ValueError(f"{flag} {name!r}: no such folder, and not a Hub id (org/name either); check the path.")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {name!r}: cannot read its config.json ({error}).") from error


def _check_numbers(args: argparse.Namespace) -> None:
    """The flags' own ranges, before any file is read."""
    if not 0.0 <= args.ensemble_alpha <= 1.0:
        raise ValueError(f"--ensemble_alpha must be in [0, 1] (1 disables ensembling), got {args.ensemble_alpha}.")
    positive = ("per_device_batch_size", "gradient_accumulation_steps", "epochs", "logging_steps", "max_steps",
                "stop_after_steps", "checkpointing_steps", "checkpoints_total_limit", "images_per_epoch",
                "shuffle_input_shards", "max_split", "max_crops", "student_size", "teacher_size")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    for name in ("dataloader_num_workers", "warmup_steps", "shuffle_buffer"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be 0 or more, got {getattr(args, name)}.")
    _check_optimiser_numbers(args)
    for name in ("content_weight", "context_weight"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            raise ValueError(f"--{name} must be a finite number >= 0, got {getattr(args, name)}.")
    if args.content_weight == 0 and args.context_weight == 0:
        raise ValueError("--content_weight and --context_weight are both 0: nothing would be learnt; give at least "
                         "one a positive weight (the recipe: 1.0 and 0.1).")
    if args.stop_after_steps is not None and args.checkpointing_steps is None:
        raise ValueError("--stop_after_steps needs --checkpointing_steps, so that the run can be resumed.")
    _check_vfm_weights(args)


def _check_vfm_weights(args: argparse.Namespace) -> None:
    if args.vfm_weights is None:
        return
    names = vfm_names(args)
    if len(args.vfm_weights) != len(names):
        raise ValueError(f"--vfm_weights has {len(args.vfm_weights)} value(s) for {len(names)} --vfm teacher(s); "
                         f"give one weight per teacher, in the same order (e.g. --vfm_weights "
                         f"{' '.join(['0.5'] * len(names)) or '1.0'}).")
    if not all(math.isfinite(weight) and weight >= 0 for weight in args.vfm_weights):
        raise ValueError(f"--vfm_weights must be finite numbers >= 0, got {args.vfm_weights}.")
    if sum(args.vfm_weights) == 0:
        raise ValueError("--vfm_weights are all 0: no context teacher would count; give at least one a positive "
                         "weight, or train without VFM with --ablation clipself.")


def _check_optimiser_numbers(args: argparse.Namespace) -> None:
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr} (the recipe: 1e-5 for a total batch of 16).")
    for beta in args.betas:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"--betas must both be in [0, 1), got {args.betas} (the recipe: 0.9 0.98).")
    if not math.isfinite(args.eps) or args.eps <= 0:
        raise ValueError(f"--eps must be a finite number > 0, got {args.eps} (the recipe: 1e-6).")
    if not math.isfinite(args.weight_decay) or args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be a finite number >= 0, got {args.weight_decay}.")


def _check_model_numbers(args: argparse.Namespace, student_config: DeCLIPVisionConfig) -> None:
    """The flags whose valid range depends on the student."""
    num_layers, patch = student_config.num_hidden_layers, student_config.patch_size
    if args.num_trainable_layers is not None and not 1 <= args.num_trainable_layers <= num_layers:
        raise ValueError(f"--num_trainable_layers must be between 1 and {num_layers} for this student.")
    if args.teacher_size is not None and args.teacher_size % patch:
        lower = args.teacher_size - args.teacher_size % patch
        raise ValueError(f"--teacher_size {args.teacher_size} is not a multiple of the student's patch size {patch}; "
                         f"use e.g. {max(lower, patch)} or {lower + patch} (default: {student_config.image_size}).")


def check_output_dir_usable(run_dir: Path) -> None:
    """--output_dir must be a folder (or creatable as one) that this user can write to."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--output_dir {str(run_dir)!r} is a file; give a folder (it is created if missing).")
    existing = next(folder for folder in (run_dir, *run_dir.absolute().parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {str(run_dir)!r} cannot be written ({existing} is not a writable folder); "
                         f"choose a folder you can write to.")


def _vfm_view(name: str) -> VFMView:
    """A context teacher's view: the patch size its adapter reads from its config, its processor's normalisation
    (ImageNet's when it has none)."""
    patch = vfm_patch_size(_read_config(name, "--vfm"), name)
    return VFMView(patch, *vfm_normalisation(name))


def _view_config(args: argparse.Namespace, student_config, vfm_views: list[VFMView]) -> tuple[ViewConfig, list[str]]:
    """The views and, per context teacher, the key of its view: teachers with the same patch size and normalisation
    (e.g. DINOv2-B and -L) share one."""
    clip_mean, clip_std = image_normalisation(args.student)
    distinct = list(dict.fromkeys(vfm_views))  # in first-use order
    first = {"vfm_patch": distinct[0].patch, "vfm_mean": distinct[0].mean, "vfm_std": distinct[0].std} if distinct \
        else {"vfm_patch": None}
    try:
        view_config = ViewConfig(
            student_size=args.student_size,
            student_patch=student_config.patch_size,
            teacher_size=student_config.image_size if args.teacher_size is None else args.teacher_size,
            max_split=args.max_split,
            max_crops=args.max_crops,
            clip_mean=clip_mean,
            clip_std=clip_std,
            extra_vfm_views=tuple(distinct[1:]),
            **first,
        )
    except ValueError as error:
        raise ValueError(f"--student_size/--teacher_size/--max_split/--max_crops: {error}") from error
    keys = list(view_config.vfm_views)
    return view_config, [keys[distinct.index(view)] for view in vfm_views]


def _declared_size(stream, split: str) -> int | None:
    splits = stream.info.splits if stream.info is not None else None
    return splits[split].num_examples if splits and split in splits and splits[split].num_examples else None


# ---------------------------------------------------------------------------------------------------------------------
# Models, data, optimisation


class DenseStudent(nn.Module):
    """The student behind its `forward`: DDP only synchronises gradients of work done through `forward`, and
    distillation needs `get_dense_features`, not CLIP's ordinary forward."""

    def __init__(self, model: DeCLIPVisionModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> DeCLIPDenseOutput:
        return self.model.get_dense_features(pixel_values)


def compile_in_place(modules, backend: str) -> None:
    """`nn.Module.compile` each module: its forward is compiled on first use, while the module, its attribute names
    and its state_dict keys stay the same, so checkpoints, `unwrap_model` and export see the eager model."""
    for module in modules:
        module.compile(backend=backend)


def build_models(args: argparse.Namespace, device: torch.device, vfm_view_keys: list[str]):
    """(student, CLIP teacher, context teachers). Only the student trains, on the path `args.decoupled_attention`
    (set by `resolve_scheme`); the frozen teachers go to `device` and stay unwrapped."""
    # The student's class (OpenAI CLIP or EVA02) follows its config; the content teacher is the same model, frozen.
    student_class = declip_vision_class(args.student)
    student = student_class.from_pretrained(args.student, decoupled_attention=args.decoupled_attention)
    configure_trainable(student, args.num_trainable_layers)
    if args.gradient_checkpointing:
        student.activation_checkpointing_enable()
    student.train()
    frozen_dtype = FROZEN_DTYPES[args.frozen_dtype]
    teacher = FrozenCLIPTeacher(student_class.from_pretrained(args.student), frozen_dtype).to(device)
    vfms = [FrozenVFM(AutoModel.from_pretrained(name), frozen_dtype) for name in vfm_names(args)]
    return student, teacher, ContextTeachers(vfms, vfm_view_keys).to(device)


def build_dataset(args: argparse.Namespace, plan: RunPlan, accelerator: Accelerator) -> ImageViewsDataset:
    """This process's disjoint part of the stream as views. Its loader must NOT go through `accelerator.prepare`:
    the stream is already split per process, and `prepare` would split the batches once more."""
    stream = plan.stream  # opened by check_args; shard_for_process returns new datasets and leaves it as it is
    warning = sharding_warning(stream, accelerator.num_processes, args.dataloader_num_workers)
    if warning and accelerator.is_main_process:
        print(warning, file=sys.stderr)
    stream = shard_for_process(stream, accelerator.process_index, accelerator.num_processes, args.seed,
                               args.shuffle_buffer, args.shuffle_input_shards)
    return ImageViewsDataset(stream, args.image_column, plan.view_config, args.seed, rank=accelerator.process_index)


def training_step(batch: dict, student: nn.Module, teacher: FrozenCLIPTeacher, context_teachers: ContextTeachers,
                  loss_fn: DeCLIPLoss, accelerator: Accelerator,
                  context_of=decoupled_context) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (§4): teachers without grad, the student through its (DDP) forward.
    `context_of` picks the student features of the context loss (the --ablation's, `TrainingScheme.context_of`)."""
    with accelerator.autocast():
        teacher_embeds = teacher(batch["crops"][batch["crop_valid"]])  # (K valid crops, D), normalised
        vfm_maps = context_teachers(batch)  # one (B, C_i, g, g) per teacher
    dense = student(batch["student"])
    return loss_fn(dense.dense_embeds, context_of(dense), batch["boxes"], batch["crop_valid"], teacher_embeds,
                   vfm_maps)


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Launch: trackers and processes


def resolve_trackers(report_to: str) -> list[str] | str:
    """--report_to as Accelerate's `log_with`. Raises ValueError for an unknown tracker or one not installed (a run
    that was asked to report somewhere must not quietly report nowhere)."""
    if report_to == "auto":
        return ["tensorboard"] if _tensorboard_installed() else []
    if report_to in ("none", ""):
        return []
    if report_to == "all":
        return "all"
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    known = sorted(LOGGER_TYPE_TO_CLASS)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--report_to: unknown tracker(s) {unknown}; valid: auto, none, all or a comma-separated "
                         f"list of {', '.join(known)}.")
    installed = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in names if name not in installed]
    if missing:
        raise ValueError(f"--report_to {report_to!r}: {', '.join(missing)} is not installed; `pip install "
                         f"{' '.join(missing)}`, or pass --report_to none (RUN_DIR/logs.jsonl is always written).")
    return names


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def build_accelerator(args: argparse.Namespace, run_dir: Path) -> Accelerator:
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=resolve_trackers(args.report_to) or None,
        project_config=project,
    )
    check_world_size(accelerator)
    return accelerator


def check_world_size(accelerator: Accelerator) -> None:
    """A launcher that starts N processes Accelerate does not join (e.g. `--multi_gpu` on a machine without GPUs)
    leaves N independent one-process runs writing into one folder: refuse it."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise ValueError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate joined "
            f"{accelerator.num_processes}: each would train alone and all would write into --output_dir. On a "
            f"machine without GPUs launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "
            f"{launched} training/distill.py ...`; with GPUs, check that each process sees one."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """Everything the loop touches."""

    args: argparse.Namespace
    argv: list[str]  # the script's command line (for the record)
    accelerator: Accelerator
    run_dir: Path
    identity: dict
    student: nn.Module  # the prepared DenseStudent
    teacher: FrozenCLIPTeacher
    context_teachers: ContextTeachers
    loss_fn: DeCLIPLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    dataset: ImageViewsDataset
    position: StreamPosition
    progress: TrainingProgress
    total_steps: int
    scheme: TrainingScheme  # the --ablation's
    evaluator: TrainingEvaluator  # --eval_every (does nothing without it)
    nonfinite_in_update: bool = False  # a micro-batch of the current update had a non-finite loss (skip mode)


def setup_run(args: argparse.Namespace, argv: list[str], plan: RunPlan, accelerator: Accelerator,
              identity: dict) -> Run:
    run_dir = Path(args.output_dir)
    set_seed(args.seed)
    student, teacher, context_teachers = build_models(args, accelerator.device, plan.vfm_view_keys)
    total_batch = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    total_steps = total_update_steps(args.max_steps, args.epochs, plan.images_per_epoch, total_batch)
    lr = scaled_learning_rate(args.lr, total_batch, args.lr_scaling)
    optimizer = build_optimizer(student, lr, args.weight_decay, args.betas, args.eps,
                                accelerator.device.type)
    scheduler = build_scheduler(optimizer, args.warmup_steps, total_steps, accelerator.num_processes)
    dense_student = DenseStudent(student)
    if args.compile:
        compile_in_place((dense_student, teacher, *context_teachers.vfms), args.compile_backend)
    prepared, optimizer, scheduler = accelerator.prepare(dense_student, optimizer, scheduler)
    dataset = build_dataset(args, plan, accelerator)
    position, progress_state, epoch_images = StreamPosition(), None, None
    if plan.resume_path is not None:
        trainer_state, data_position = load_checkpoint(accelerator, plan.resume_path)
        dataset.load_stream_state(data_position)
        position.load_state_dict(data_position)
        progress_state, epoch_images = trainer_state["progress"], data_position.get("epoch_images")
    if accelerator.is_main_process:
        print(startup_summary(args, accelerator, total_batch, lr, total_steps))
        if plan.resume_path is not None:
            print(f"Resuming from {plan.resume_path.name} (update {progress_state['step']} of {total_steps}, "
                  f"epoch {position.epoch}).")
        write_training_args(run_dir / "training_args.json", args, argv, accelerator, identity, summary={})
    loss_fn = DeCLIPLoss(args.content_weight, args.context_weight, teacher_weights(args), teacher_names(args))
    progress = TrainingProgress(accelerator, run_dir / "logs.jsonl", total_steps, args.logging_steps, progress_state,
                                loss_names=loss_fn.term_names)
    progress.epoch_images = EpochImageCounts(epoch_images)
    accelerator.init_trackers("declip_distill", config=_tracker_config(args))
    evaluator = TrainingEvaluator(args, plan.evaluation_specs, accelerator, student, run_dir,
                                  resumed_step=progress_state["step"] if plan.resume_path is not None else None)
    return Run(args, argv, accelerator, run_dir, identity, prepared, teacher, context_teachers, loss_fn, optimizer,
               scheduler, dataset, position, progress, total_steps, scheme=TRAINING_SCHEMES[args.ablation],
               evaluator=evaluator)


def startup_summary(args: argparse.Namespace, accelerator: Accelerator, total_batch: int, lr: float,
                    total_steps: int) -> str:
    return (f"Distilling on {accelerator.num_processes} process(es) ({accelerator.device.type}): "
            f"{args.per_device_batch_size} images per device x {accelerator.num_processes} x "
            f"{args.gradient_accumulation_steps} accumulation = total batch {total_batch}; lr {args.lr:g} -> "
            f"{lr:.3g} ({args.lr_scaling} scaling); {total_steps} updates ({args.warmup_steps} warmup); precision "
            f"{accelerator.mixed_precision}; teachers: {args.student} (content), {_context_description(args)}, "
            f"{args.frozen_dtype}; student path {args.decoupled_attention}.")


def _context_description(args: argparse.Namespace) -> str:
    names = vfm_names(args)
    if not names:
        return f"no context teacher (--ablation {args.ablation})"
    if len(names) == 1:
        return f"{names[0]} (context)"
    weights = teacher_weights(args)
    return "context ensemble " + " + ".join(f"{weight:g} x {name}" for weight, name in zip(weights, names))


def _tracker_config(args: argparse.Namespace) -> dict:
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }


def train(run: Run) -> None:
    """Epochs over the stream until the schedule (or --stop_after_steps) is done; all processes stop together."""
    stop_at = min(run.total_steps, run.args.stop_after_steps or run.total_steps)
    epoch = run.position.epoch
    # A checkpoint from the very end of an epoch resumes into that epoch with nothing left in it.
    resumed_epoch = epoch if run.position.batches else None
    while run.progress.step < stop_at:
        if run.position.epoch != epoch:
            run.position.start_epoch(epoch)
        run.dataset.set_epoch(epoch)
        updates_before, stopped = run.progress.step, False
        loader = ExhaustionTracking(make_dataloader(run.dataset, run.args.per_device_batch_size,
                                                    run.args.dataloader_num_workers))
        for batch in batches_in_step(loader, run.accelerator):
            run.position.advance(batch)
            if run_one_batch(run, batch, epoch) and run.progress.step >= stop_at:
                stopped = True
                break
        if run.progress.step == updates_before and epoch != resumed_epoch:
            raise TrainingFailed(no_update_message(run, epoch))
        if not stopped or run.progress.step >= run.total_steps:  # an epoch cut by --stop_after_steps goes on later
            run.progress.end_epoch(epoch, loader.exhausted, ended_by="max_steps" if stopped else "data")
        epoch += 1
        if run.args.max_steps is None and epoch >= run.args.epochs:
            break
    stopped_early = run.progress.step < run.total_steps
    if stopped_early and run.args.checkpointing_steps and run.progress.step % run.args.checkpointing_steps:
        checkpoint(run, epoch=run.position.epoch)  # --stop_after_steps between two saves: resume from here


class ExhaustionTracking:
    """A loader that remembers whether this process read it to the end (for the per-process epoch counts)."""

    def __init__(self, loader):
        self.loader = loader
        self.exhausted = False

    def __iter__(self):
        yield from self.loader
        self.exhausted = True


def no_update_message(run: Run, epoch: int) -> str:
    """Why an epoch gave no update, with every process's usable and skipped images (also logged)."""
    usable, skipped = run.dataset.survey(max_examples=100_000)  # this process's part of the epoch
    mine = torch.tensor([[usable, *skipped.as_tensor().tolist()]], dtype=torch.int64, device=run.accelerator.device)
    rows = run.accelerator.gather(mine).cpu().tolist()  # (processes, 1 + reasons)
    per_rank = [{"usable": row[0], "skipped": dict(zip(skipped.as_dict(), row[1:]))} for row in rows]
    needed = run.args.per_device_batch_size * run.args.gradient_accumulation_steps
    message = (f"Epoch {epoch} produced no update: one update needs {needed} usable images (--per_device_batch_size "
               f"x --gradient_accumulation_steps) on every process, and the data has "
               + "; ".join(f"rank {rank}: {counts['usable']} usable, skipped {_nonzero(counts['skipped'])}"
                           for rank, counts in enumerate(per_rank))
               + ". Check --dataset and --image_column, or remove the unusable images.")
    run.progress.log_event("error", epoch=epoch, message=message, per_rank=per_rank)
    return message


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counts.items() if count) or "none"


def run_one_batch(run: Run, batch: dict, epoch: int) -> bool:
    """Forward/backward of one batch; returns True when it completed an optimizer update (or skipped it for a
    non-finite loss under --on_nonfinite skip)."""
    accelerator = run.accelerator
    if run.args.log_image_hashes:
        log_image_hashes(run, batch, epoch)
    skipped = batch.pop("skipped")
    batch = to_device(batch, accelerator.device)
    with accelerator.accumulate(run.student):
        terms = training_step(batch, run.student, run.teacher, run.context_teachers, run.loss_fn, accelerator,
                              run.scheme.context_of)
        finite = all_processes_finite(terms, accelerator)
        if finite:
            accelerator.backward(terms["total"])
        else:
            on_nonfinite_loss(run, terms, epoch)  # raises unless --on_nonfinite skip
            run.nonfinite_in_update = True
        if not run.nonfinite_in_update:
            run.optimizer.step()  # (a no-op until the last micro-batch of the update)
        run.scheduler.step()  # also for a skipped update: the schedule stays counted in updates
        run.optimizer.zero_grad(set_to_none=True)
    run.progress.add_micro_batch(terms, batch["student"].shape[0], skipped, finite)
    if not accelerator.sync_gradients:
        return False
    run.progress.end_update(epoch, run.scheduler.get_last_lr()[0], skipped_update=run.nonfinite_in_update)
    run.nonfinite_in_update = False
    run.evaluator.after_update(run.progress.step, epoch, run.progress)  # before the checkpoint of this step
    if run.args.checkpointing_steps and run.progress.step % run.args.checkpointing_steps == 0:
        checkpoint(run, epoch)
    return True


def all_processes_finite(terms: dict[str, torch.Tensor], accelerator: Accelerator) -> bool:
    """Whether every process's loss terms are finite (all processes must take the same branch)."""
    finite = torch.stack([term.detach().float() for term in terms.values()]).isfinite().all()
    return bool(accelerator.gather(finite.to(torch.int64).reshape(1)).min())


def on_nonfinite_loss(run: Run, terms: dict[str, torch.Tensor], epoch: int) -> None:
    values = ", ".join(f"{name} {term.item():.4g}" for name, term in terms.items())
    where = f"update {run.progress.step + 1} (epoch {epoch})"
    if run.args.on_nonfinite == "stop":
        message = (f"Non-finite loss at {where}: {values} (on this process; some process had NaN/inf). The run "
                   f"diverged (learning rate now {run.scheduler.get_last_lr()[0]:.3g}) or met a broken batch; "
                   f"nothing more was saved. Lower --lr and start again (a new --output_dir or "
                   f"--overwrite_output_dir), or resume the newest checkpoint with --on_nonfinite skip to drop such "
                   f"updates.")
        run.progress.log_event("error", epoch=epoch, message=message)
        raise TrainingFailed(message)
    if run.accelerator.is_main_process:
        print(f"Warning: non-finite loss at {where} ({values}): update skipped (--on_nonfinite skip).",
              file=sys.stderr)


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Never save NaN/inf weights: a model that loads fine and outputs NaN is worse than no model."""
    bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        raise TrainingFailed(f"Not saving {what}: {len(bad)} weight tensor(s) hold NaN/inf (e.g. {bad[0]}); the "
                             f"run diverged. Lower --lr and start again, or resume an earlier checkpoint.")


def checkpoint(run: Run, epoch: int) -> None:
    check_finite_weights(run.student, f"checkpoint-{run.progress.step}")
    trainer_state = {"epoch": epoch, "progress": run.progress.state_dict(), RUN_IDENTITY_KEY: run.identity,
                     "resumable_args": resumable_args(run.args)}
    data_position = {**run.position.state_dict(), "epoch_images": run.progress.epoch_images.state_dict()}
    save_checkpoint(run.accelerator, run.run_dir / "checkpoints", run.progress.step, trainer_state, data_position,
                    run.args.checkpoints_total_limit)


def log_image_hashes(run: Run, batch: dict, epoch: int) -> None:
    """Debug trace: the student view fully determines the image, so its hash identifies the image."""
    folder = run.run_dir / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"image_hashes_rank{run.accelerator.process_index}.txt").open("a") as trace:
        for view in batch["student"]:
            trace.write(f"{epoch}\t{hashlib.sha1(view.numpy().tobytes()).hexdigest()}\n")


def finish(run: Run) -> dict:
    """Save the model folder and training_args.json; returns the summary."""
    accelerator = run.accelerator
    run.progress.flush(run.position.epoch, run.scheduler.get_last_lr()[0])
    run.progress.close()
    accelerator.wait_for_everyone()
    summary = {**run.progress.state_dict(), "world_size": accelerator.num_processes,
               "finished": run.progress.step >= run.total_steps, "total_steps": run.total_steps}
    summary["steps"] = summary.pop("step")
    student = accelerator.unwrap_model(run.student).model
    check_finite_weights(student, "the model")
    error = ""
    if accelerator.is_main_process:
        with quiet_transformers():
            error = failure_of(lambda: save_model(student, run.run_dir / "model", run.args.student,
                                                  run.args.ensemble_alpha, run.args.student_size))
    failure = first_failure(accelerator, error)  # the others wait here, and learn whether the save failed
    if failure:
        raise ModelSaveFailed(f"Could not save the model to {run.run_dir / 'model'} ({failure}). Free space (or "
                              f"choose another --output_dir) and relaunch with --resume_from_checkpoint latest.")
    if accelerator.is_main_process:
        write_training_args(run.run_dir / "training_args.json", run.args, run.argv, accelerator, run.identity,
                            summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def launch_settings(accelerator: Accelerator) -> dict:
    """What the launcher decided (the script's flags cannot show it): processes, effective precision, and the
    ACCELERATE_* variables `accelerate launch` / `accelerate config` passed."""
    return {
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type.value),
        "device": accelerator.device.type,
        "accelerate_env": {key: value for key, value in sorted(os.environ.items()) if key.startswith("ACCELERATE_")},
    }


def launch_command(accelerator: Accelerator, argv: list[str]) -> str:
    """The command line that started this run, with the launcher's flags rebuilt from what Accelerate reports
    (an `accelerate config` file's settings show up as flags too)."""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # set by `accelerate launch` for every kind of run
        return shlex.join(["torchrun" if "LOCAL_RANK" in os.environ else "python", sys.argv[0], *argv])
    env, launcher = [], ["accelerate", "launch"]
    if accelerator.num_processes > 1:
        if accelerator.distributed_type.value in ("MULTI_GPU", "MULTI_CPU"):
            launcher.append("--multi_gpu")
        launcher += ["--num_processes", str(accelerator.num_processes)]
        if accelerator.device.type == "cpu":
            env.append("ACCELERATE_USE_CPU=1")
    if accelerator.mixed_precision != "no":
        launcher += ["--mixed_precision", accelerator.mixed_precision]
    return " ".join(env + [shlex.join(launcher + [sys.argv[0], *argv])])


def write_training_args(path: Path, args: argparse.Namespace, argv: list[str], accelerator: Accelerator,
                        identity: dict, summary: dict) -> None:
    """The run's record (read by `declip_hf.hub.release` for the model card); rewritten at the end with the summary."""
    versions = {package.__name__: package.__version__ for package in (torch, transformers, accelerate, datasets)}
    versions["declip_hf"] = declip_hf.__version__
    recorded_args = {**vars(args), "mixed_precision": accelerator.mixed_precision}  # effective, not the flag's None
    record = {"command": launch_command(accelerator, argv), "args": recorded_args,
              "launch": launch_settings(accelerator), RUN_IDENTITY_KEY: identity, "summary": summary,
              "versions": versions}
    write_file_atomically(path, json.dumps(record, indent=2, default=str) + "\n")


def fail(message: str, exit_code: int, accelerator: Accelerator | None = None):
    """One line on stderr (from one process) and the exit code: 2 for arguments and data, 1 for a failed run.

    With `accelerator` (for a `FailedOnEveryProcess` error, which every process raises at the same point) the
    processes meet once more after the line is written: the launcher stops the remaining processes as soon as one
    exits, which could otherwise cut the main process off before its line."""
    if is_first_process():
        print(f"distill.py: error: {message}", file=sys.stderr, flush=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    sys.exit(exit_code)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = parse_args(argv)
    try:
        if args.make_tiny_assets:
            make_tiny_assets(args.make_tiny_assets)
        plan = check_args(args)
        accelerator = build_accelerator(args, Path(args.output_dir))
        identity = claim_output_dir(args, plan.resume_path, accelerator)
    except ValueError as error:
        fail(str(error), exit_code=2)
    run = None
    try:
        with quiet_transformers():
            run = setup_run(args, argv, plan, accelerator, identity)
        train(run)
        summary = finish(run)
    except (TrainingFailed, FailedOnEveryProcess) as error:  # checkpoint, evaluation and model-save failures too
        if run is not None:
            run.progress.close()  # ends the progress bar's line, so the error is a line of its own
        in_step = run is not None and isinstance(error, FailedOnEveryProcess)
        fail(str(error), exit_code=1, accelerator=run.accelerator if in_step else None)
    if run.accelerator.is_main_process:
        losses = ", ".join(f"{name} {_format_loss(value)}" for name, value in summary["final_losses"].items())
        print(f"Done: {summary['steps']} steps, {summary['images_seen']} images on {summary['world_size']} "
              f"process(es), skipped {sum(summary['skipped'].values())} {summary['skipped']}, "
              f"{summary['nonfinite_updates']} non-finite update(s) skipped, final losses [{losses}], "
              f"{summary['elapsed_s']:.0f} s. Model: {run.run_dir / 'model'}")
    return summary


def _format_loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
