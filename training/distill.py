"""DeCLIP distillation with Accelerate (CVPR 2025, arXiv 2505.04410; docs/method.md §3-5).

Turns a CLIP into a DeCLIP: the student's decoupled last layer learns content from the frozen starting CLIP (RoI
features of grid crops vs. the teacher's crop embeddings) and context from a frozen DINOv2 (patch correlations).

    accelerate launch training/distill.py --config configs/tiny.yaml
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 \\
        training/distill.py --config configs/declip_vitb16_coco.yaml

Every flag can also be a key of the `--config` YAML file; flags given on the command line win. Outputs go to
`--output_dir` (RUN_DIR): `model/` (the distilled model), `training_args.json`, `logs.jsonl`, `checkpoints/`.
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
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
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import declip_hf
from declip_hf import TRAINABLE_ATTENTION_MODES, DeCLIPDenseOutput, DeCLIPVisionConfig, DeCLIPVisionModel
from declip_hf.loading_utils import image_normalisation, quiet_transformers
from training.checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from training.data import (
    ImageViewsDataset,
    StreamPosition,
    batches_in_step,
    make_dataloader,
    open_image_stream,
    shard_for_process,
    sharding_warning,
)
from training.export import save_model
from training.losses import DeCLIPLoss
from training.optim import LR_SCALINGS, build_optimizer, build_scheduler, configure_trainable, scaled_learning_rate
from training.optim import total_update_steps
from training.progress import TrainingProgress
from training.teachers import FrozenCLIPTeacher, FrozenVFM, check_vfm_config
from training.tiny_assets import make_tiny_assets
from training.views import ViewConfig

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STUDENT_MODEL_TYPES = ("clip", "clip_vision_model", DeCLIPVisionConfig.model_type)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    flag = argparse.BooleanOptionalAction
    add("--config", help="YAML file whose keys are these flags' names (without --); command-line flags override it.")
    add("--make_tiny_assets", metavar="DIR", help="Write tiny random CLIP/DINOv2 checkpoints (DIR/clip, DIR/dinov2) "
        "and generated parquet images (DIR/images) there if DIR does not exist yet; for the built-in demo config.")
    # Models
    add("--student", help="The CLIP to distil: Hub id or folder of a CLIPModel, CLIPVisionModel(WithProjection) or "
        "DeCLIP checkpoint (e.g. openai/clip-vit-base-patch16). Also the frozen content teacher.")
    add("--vfm", help="The frozen context teacher: Hub id or folder of a Dinov2Model or Dinov2WithRegistersModel "
        "(e.g. facebook/dinov2-base). Its CLS and register tokens are dropped.")
    add("--decoupled_attention", default="qq", choices=TRAINABLE_ATTENTION_MODES,
        help="The decoupled last layer's attention (docs/method.md §1): qq, kk, vv, csa (qq + kk weights) or all.")
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
    add("--logging_steps", type=int, default=10, help="Log every N updates.")
    add("--log_image_hashes", action=flag, default=False, help="Debug: write a hash of every image each process "
        "trains on to RUN_DIR/debug/image_hashes_rank<r>.txt (to check that processes see disjoint data).")
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
            config_argv = yaml_to_argv(yaml.safe_load(Path(known.config).read_text()) or {}, parser)
        except (OSError, ValueError, yaml.YAMLError) as error:
            parser.error(f"--config {known.config}: {error}")
    return parser.parse_args(config_argv + argv)  # later tokens win: the command line overrides the file


# ---------------------------------------------------------------------------------------------------------------------
# Start-up checks: everything that can be wrong with the arguments is found here, from configs, before any model.


@dataclass
class RunPlan:
    """What the checks learnt: the views' geometry and how long the schedule is."""

    view_config: ViewConfig
    images_per_epoch: int | None
    resume_path: Path | None


def check_args(args: argparse.Namespace) -> RunPlan:
    """Raise ValueError with what to change if the arguments cannot make a run."""
    for name in ("student", "vfm", "dataset"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required (on the command line or in the --config file).")
    student_config = _read_config(args.student, "--student")
    if student_config.model_type not in STUDENT_MODEL_TYPES:
        raise ValueError(f"--student {args.student!r} is a {student_config.model_type!r} model; give a CLIP "
                         f"checkpoint ({', '.join(STUDENT_MODEL_TYPES)}).")
    student_config = DeCLIPVisionConfig.from_pretrained(args.student)
    vfm_config = _read_config(args.vfm, "--vfm")
    check_vfm_config(vfm_config, args.vfm)
    _check_numbers(args, student_config)
    view_config = _view_config(args, student_config, vfm_config)
    try:
        stream = open_image_stream(args.dataset, args.split, args.image_column, data_files=args.data_files)
    except OSError as error:  # e.g. a Hub id that cannot be reached
        raise ValueError(f"--dataset {args.dataset!r} (split {args.split!r}) cannot be opened: {error}") from error
    images_per_epoch = args.images_per_epoch or _declared_size(stream, args.split)
    if args.max_steps is None and images_per_epoch is None:
        raise ValueError(f"The size of {args.dataset!r} is unknown while streaming: give --max_steps, or "
                         f"--images_per_epoch with --epochs.")
    resume_path = resolve_resume(args.resume_from_checkpoint, Path(args.output_dir) / "checkpoints")
    return RunPlan(view_config, images_per_epoch, resume_path)


def _read_config(name: str, flag: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {name!r}: cannot read its config.json ({error}).") from error


def _check_numbers(args: argparse.Namespace, student_config: DeCLIPVisionConfig) -> None:
    num_layers = student_config.num_hidden_layers
    if args.num_trainable_layers is not None and not 1 <= args.num_trainable_layers <= num_layers:
        raise ValueError(f"--num_trainable_layers must be between 1 and {num_layers} for this student.")
    if not 0.0 <= args.ensemble_alpha <= 1.0:
        raise ValueError(f"--ensemble_alpha must be in [0, 1] (1 disables ensembling), got {args.ensemble_alpha}.")
    positive = ("per_device_batch_size", "gradient_accumulation_steps", "epochs", "logging_steps", "max_steps",
                "stop_after_steps", "checkpointing_steps", "checkpoints_total_limit", "images_per_epoch")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.stop_after_steps is not None and args.checkpointing_steps is None:
        raise ValueError("--stop_after_steps needs --checkpointing_steps, so that the run can be resumed.")


def _view_config(args: argparse.Namespace, student_config, vfm_config) -> ViewConfig:
    clip_mean, clip_std = image_normalisation(args.student)
    vfm_mean, vfm_std = image_normalisation(args.vfm, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    try:
        return ViewConfig(
            student_size=args.student_size,
            student_patch=student_config.patch_size,
            teacher_size=args.teacher_size or student_config.image_size,
            vfm_patch=vfm_config.patch_size,
            max_split=args.max_split,
            max_crops=args.max_crops,
            clip_mean=clip_mean,
            clip_std=clip_std,
            vfm_mean=vfm_mean,
            vfm_std=vfm_std,
        )
    except ValueError as error:
        raise ValueError(f"--student_size/--teacher_size/--max_split/--max_crops: {error}") from error


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


def build_models(args: argparse.Namespace, device: torch.device):
    """(student, CLIP teacher, VFM). Only the student trains; the frozen two go to `device` and stay unwrapped."""
    student = DeCLIPVisionModel.from_pretrained(args.student, decoupled_attention=args.decoupled_attention)
    configure_trainable(student, args.num_trainable_layers)
    if args.gradient_checkpointing:
        student.activation_checkpointing_enable()
    student.train()
    frozen_dtype = FROZEN_DTYPES[args.frozen_dtype]
    teacher = FrozenCLIPTeacher(DeCLIPVisionModel.from_pretrained(args.student), frozen_dtype).to(device)
    vfm = FrozenVFM(AutoModel.from_pretrained(args.vfm), frozen_dtype).to(device)
    return student, teacher, vfm


def build_dataset(args: argparse.Namespace, plan: RunPlan, accelerator: Accelerator) -> ImageViewsDataset:
    """This process's disjoint part of the stream as views. Its loader must NOT go through `accelerator.prepare`:
    the stream is already split per process, and `prepare` would split the batches once more."""
    stream = open_image_stream(args.dataset, args.split, args.image_column, data_files=args.data_files)
    warning = sharding_warning(stream, accelerator.num_processes, args.dataloader_num_workers)
    if warning and accelerator.is_main_process:
        print(warning, file=sys.stderr)
    stream = shard_for_process(stream, accelerator.process_index, accelerator.num_processes, args.seed,
                               args.shuffle_buffer, args.shuffle_input_shards)
    return ImageViewsDataset(stream, args.image_column, plan.view_config, args.seed, rank=accelerator.process_index)


def training_step(batch: dict, student: nn.Module, teacher: FrozenCLIPTeacher, vfm: FrozenVFM, loss_fn: DeCLIPLoss,
                  accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (§4): teachers without grad, the student through its (DDP) forward."""
    with accelerator.autocast():
        teacher_embeds = teacher(batch["crops"][batch["crop_valid"]])  # (K valid crops, D), normalised
        vfm_map = vfm(batch["vfm"])  # (B, C_vfm, g, g)
    dense = student(batch["student"])
    return loss_fn(dense.dense_embeds, dense.context_features, batch["boxes"], batch["crop_valid"], teacher_embeds,
                   vfm_map)


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The run


def resolve_trackers(report_to: str) -> list[str] | str:
    if report_to == "auto":
        return ["tensorboard"] if _tensorboard_installed() else []
    if report_to in ("none", ""):
        return []
    return "all" if report_to == "all" else [name.strip() for name in report_to.split(",")]


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def build_accelerator(args: argparse.Namespace, run_dir: Path) -> Accelerator:
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard"))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=resolve_trackers(args.report_to) or None,
        project_config=project,
    )


@dataclass
class Run:
    """Everything the loop touches."""

    args: argparse.Namespace
    accelerator: Accelerator
    run_dir: Path
    student: nn.Module  # the prepared DenseStudent
    teacher: FrozenCLIPTeacher
    vfm: FrozenVFM
    loss_fn: DeCLIPLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    dataset: ImageViewsDataset
    position: StreamPosition
    progress: TrainingProgress
    total_steps: int


def setup_run(args: argparse.Namespace, plan: RunPlan) -> Run:
    run_dir = Path(args.output_dir)
    accelerator = build_accelerator(args, run_dir)
    set_seed(args.seed)
    student, teacher, vfm = build_models(args, accelerator.device)
    total_batch = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    total_steps = total_update_steps(args.max_steps, args.epochs, plan.images_per_epoch, total_batch)
    lr = scaled_learning_rate(args.lr, total_batch, args.lr_scaling)
    optimizer = build_optimizer(student, lr, args.weight_decay, args.betas, args.eps,
                                accelerator.device.type)
    scheduler = build_scheduler(optimizer, args.warmup_steps, total_steps, accelerator.num_processes)
    prepared, optimizer, scheduler = accelerator.prepare(DenseStudent(student), optimizer, scheduler)
    dataset = build_dataset(args, plan, accelerator)
    position, progress_state = StreamPosition(), None
    if plan.resume_path is not None:
        trainer_state, data_position = load_checkpoint(accelerator, plan.resume_path)
        dataset.load_stream_state(data_position)
        position.load_state_dict(data_position)
        progress_state = trainer_state["progress"]
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if plan.resume_path is None:
            shutil.rmtree(run_dir / "debug", ignore_errors=True)  # traces of an earlier run in the same folder
    accelerator.wait_for_everyone()
    progress = TrainingProgress(accelerator, run_dir / "logs.jsonl", total_steps, args.logging_steps, progress_state)
    accelerator.init_trackers("declip_distill", config=_tracker_config(args))
    loss_fn = DeCLIPLoss(args.content_weight, args.context_weight)
    return Run(args, accelerator, run_dir, prepared, teacher, vfm, loss_fn, optimizer, scheduler, dataset, position,
               progress, total_steps)


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
        updates_before = run.progress.step
        for batch in batches_in_step(make_dataloader(run.dataset, run.args.per_device_batch_size,
                                                     run.args.dataloader_num_workers), run.accelerator):
            run.position.advance(batch)
            if run_one_batch(run, batch, epoch) and run.progress.step >= stop_at:
                break
        if run.progress.step == updates_before and epoch != resumed_epoch:
            raise RuntimeError(f"Epoch {epoch} produced no update: the dataset has fewer usable images than one "
                               f"update needs on every process.")
        epoch += 1
        if run.args.max_steps is None and epoch >= run.args.epochs:
            break
    stopped_early = run.progress.step < run.total_steps
    if stopped_early and run.args.checkpointing_steps and run.progress.step % run.args.checkpointing_steps:
        checkpoint(run, epoch=run.position.epoch)  # --stop_after_steps between two saves: resume from here


def run_one_batch(run: Run, batch: dict, epoch: int) -> bool:
    """Forward/backward of one batch; returns True when it completed an optimizer update."""
    accelerator = run.accelerator
    if run.args.log_image_hashes:
        log_image_hashes(run, batch, epoch)
    skipped = batch.pop("skipped")
    batch = to_device(batch, accelerator.device)
    with accelerator.accumulate(run.student):
        terms = training_step(batch, run.student, run.teacher, run.vfm, run.loss_fn, accelerator)
        accelerator.backward(terms["total"])
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.progress.add_micro_batch(terms, batch["student"].shape[0], skipped)
    if not accelerator.sync_gradients:
        return False
    run.progress.end_update(epoch, run.scheduler.get_last_lr()[0])
    if run.args.checkpointing_steps and run.progress.step % run.args.checkpointing_steps == 0:
        checkpoint(run, epoch)
    return True


def checkpoint(run: Run, epoch: int) -> None:
    trainer_state = {"epoch": epoch, "progress": run.progress.state_dict()}
    save_checkpoint(run.accelerator, run.run_dir / "checkpoints", run.progress.step, trainer_state,
                    run.position.state_dict(), run.args.checkpoints_total_limit)


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
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(run.student).model
        with quiet_transformers():
            save_model(student, run.run_dir / "model", run.args.student, run.args.ensemble_alpha,
                       run.args.student_size)
        write_training_args(run.run_dir / "training_args.json", run.args, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def launch_command() -> str:
    """The command line that started this run, as well as it can be seen from here (the launcher's own flags are
    not visible to the script; they show in `summary.world_size` and the `mixed_precision` arg)."""
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by `accelerate launch` for every kind of run
        launcher = ["accelerate", "launch"]
    elif "LOCAL_RANK" in os.environ:
        launcher = ["torchrun"]
    else:
        launcher = ["python"]
    return shlex.join(launcher + sys.argv)


def write_training_args(path: Path, args: argparse.Namespace, summary: dict) -> None:
    versions = {package.__name__: package.__version__ for package in (torch, transformers, accelerate, datasets)}
    versions["declip_hf"] = declip_hf.__version__
    record = {"command": launch_command(), "args": vars(args), "summary": summary, "versions": versions}
    path.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parse_args(argv)
    try:
        if args.make_tiny_assets:
            make_tiny_assets(args.make_tiny_assets)
        plan = check_args(args)
    except ValueError as error:
        parser.error(str(error))
    with quiet_transformers():
        run = setup_run(args, plan)
    train(run)
    summary = finish(run)
    if run.accelerator.is_main_process:
        losses = ", ".join(f"{name} {value:.4f}" for name, value in summary["final_losses"].items())
        print(f"Done: {summary['steps']} steps, {summary['images_seen']} images on {summary['world_size']} "
              f"process(es), skipped {sum(summary['skipped'].values())} {summary['skipped']}, final losses "
              f"[{losses}], {summary['elapsed_s']:.0f} s. Model: {run.run_dir / 'model'}")
    return summary


if __name__ == "__main__":
    main()
