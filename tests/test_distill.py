"""The distillation script (training/distill.py): trainable set, optimiser groups, schedule, start-up checks, and
real runs on tiny models: two processes, resume, and the losses going down."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor, CLIPTextModelWithProjection

from declip_hf import TRAINABLE_ATTENTION_MODES, DeCLIPVisionModel
from training import distill
from training.data import collate_views
from training.losses import DeCLIPLoss, context_loss
from training.export import save_model
from training.optim import (
    build_scheduler, configure_trainable, parameter_groups, scaled_learning_rate, total_update_steps
)
from training.progress import LOSS_NAMES, TrainingProgress
from training.teachers import ContextTeachers, FrozenCLIPTeacher, FrozenVFM
from training.tiny_assets import NUM_BAD_IMAGES, synthetic_image, write_image_shards
from training.views import SKIP_REASONS, ViewConfig, make_views, to_rgb

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tiny CLIP: patch 4, image 32 -> student view 64 px is a 16 x 16 grid; tiny DINOv2 patch 2 -> VFM view 32 px.
STUDENT_SIZE = 64


def _tiny_view_config() -> ViewConfig:
    return ViewConfig(student_size=STUDENT_SIZE, student_patch=4, teacher_size=32, vfm_patch=2, max_crops=8)


def _batch(num_images: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images = [to_rgb(synthetic_image(index, rng)) for index in range(num_images)]
    examples = [make_views(image, _tiny_view_config(), random.Random(seed + i)) for i, image in enumerate(images)]
    for example in examples:
        example.update(skipped=torch.zeros(len(SKIP_REASONS), dtype=torch.long), worker=torch.tensor(0),
                       num_workers=torch.tensor(1), stream_position=torch.tensor(0))
    return collate_views(examples)


def _run_in_process(argv: list[str]) -> dict:
    """`main` in this process (much faster than a launch); Accelerate's singletons are reset around it."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return distill.main([str(arg) for arg in argv])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _all_log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs.jsonl").read_text().splitlines()]


def _logs(run_dir: Path) -> list[dict]:
    """The update records (epoch ends and errors are `event` records)."""
    return [record for record in _all_log_records(run_dir) if "event" not in record]


def _events(run_dir: Path, event: str) -> list[dict]:
    return [record for record in _all_log_records(run_dir) if record.get("event") == event]


# ------------------------------------------------------------------------------------------------ trainable set, optim


def _expected_frozen(name: str, mode: str, last: int) -> bool:
    """The rule of docs/method.md §5 plus the last layer's parts the decoupled path never reads, written out plainly."""
    if not name.startswith("encoder.layers."):
        return True  # embeddings, pre_layrnorm, post_layernorm, visual_projection
    layer = int(name.split(".")[2])
    if layer != last:
        return False
    unused_projections = {"qq": ["k_proj"], "kk": ["q_proj"], "vv": ["q_proj", "k_proj"], "csa": [], "all": []}[mode]
    return ".mlp." in name or ".layer_norm2." in name or any(f".{p}." in name for p in unused_projections)


@pytest.mark.parametrize("mode", TRAINABLE_ATTENTION_MODES)
def test_trainable_set_and_every_trainable_parameter_gets_a_gradient(mode, tiny_clip_dir, tiny_dinov2_dir):
    student = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention=mode)
    trainable = set(configure_trainable(student))
    last = student.config.num_hidden_layers - 1
    names = [name for name, _ in student.named_parameters()]
    assert trainable == {name for name in names if not _expected_frozen(name, mode, last)}

    teacher = FrozenCLIPTeacher(DeCLIPVisionModel.from_pretrained(tiny_clip_dir))
    vfm = ContextTeachers([FrozenVFM(AutoModel.from_pretrained(tiny_dinov2_dir))], ["vfm"])
    _assert_one_step_reaches_exactly(student, trainable, teacher, vfm)
    assert all(p.grad is None for p in [*teacher.parameters(), *vfm.parameters()])


def _assert_one_step_reaches_exactly(student, trainable: set[str], teacher, vfm) -> None:
    """One training step's backward gives every trainable parameter a non-zero gradient and the others none."""
    terms = distill.training_step(_batch(2, seed=1), distill.DenseStudent(student), teacher, vfm, DeCLIPLoss(),
                                  Accelerator(cpu=True))
    terms["total"].backward()
    for name, parameter in student.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_num_trainable_layers_keeps_earlier_layers_frozen(tiny_clip_dir):
    student = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="csa")
    trainable = configure_trainable(student, num_trainable_layers=1)
    assert trainable and all(name.startswith("encoder.layers.1.") for name in trainable)
    with pytest.raises(ValueError, match="between 1 and 2"):
        configure_trainable(student, num_trainable_layers=3)


@pytest.mark.parametrize("scheme, mode, unused",
                         [("coupled", "vanilla", []), ("clipself", "maskclip", ["q_proj", "k_proj"])])
def test_baseline_paths_train_what_they_read(scheme, mode, unused, tiny_clip_dir, tiny_dinov2_dir):
    """The ablations (docs/method.md §10) distil the baseline paths (before: refused): vanilla trains its whole last
    layer, MLP included; maskclip all of it but q and k, which its value path never reads. Every trainable parameter
    gets a gradient (DDP requires it)."""
    from training.losses import TRAINING_SCHEMES

    student = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention=mode)
    trainable = set(configure_trainable(student))
    last_layer = {name for name, _ in student.named_parameters() if name.startswith("encoder.layers.1.")}
    assert last_layer - trainable == {name for name in last_layer if any(f".{p}." in name for p in unused)}
    assert "encoder.layers.1.mlp.fc2.weight" in trainable
    uses_vfm = TRAINING_SCHEMES[scheme].uses_vfm
    vfms = [FrozenVFM(AutoModel.from_pretrained(tiny_dinov2_dir))] if uses_vfm else []
    teacher = FrozenCLIPTeacher(DeCLIPVisionModel.from_pretrained(tiny_clip_dir))
    loss_fn = DeCLIPLoss(teacher_weights=(1.0,) if uses_vfm else ())
    terms = distill.training_step(_batch(2, seed=2), distill.DenseStudent(student), teacher,
                                  ContextTeachers(vfms, ["vfm"] * len(vfms)), loss_fn, Accelerator(cpu=True),
                                  TRAINING_SCHEMES[scheme].context_of)
    terms["total"].backward()
    for name, parameter in student.named_parameters():
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == (name in trainable), name


def test_run_length_and_lr_scaling_errors_name_what_to_pass():
    assert total_update_steps(None, epochs=2, images_per_epoch=10, batch_per_update=4) == 2 * 3
    assert total_update_steps(7, epochs=2, images_per_epoch=None, batch_per_update=4) == 7
    with pytest.raises(ValueError, match="--max_steps.*--images_per_epoch"):
        total_update_steps(None, epochs=2, images_per_epoch=None, batch_per_update=4)
    assert scaled_learning_rate(1e-4, 32, "linear") == pytest.approx(2e-4)
    with pytest.raises(ValueError, match=r"\['linear', 'none'\]"):
        scaled_learning_rate(1e-4, 32, "sqrt")


class _RecordingAccelerator:
    """One process: `reduce` is the identity, and the tensors it is given are kept."""

    device = torch.device("cpu")
    is_main_process = True
    num_processes = 1

    def __init__(self):
        self.reduced = []

    def reduce(self, tensor, reduction):
        self.reduced.append(tensor.clone())
        return tensor

    def log(self, values, step):
        pass


def test_progress_reduces_float32_losses_and_int64_counts(tmp_path):
    accelerator = _RecordingAccelerator()
    progress = TrainingProgress(accelerator, tmp_path / "logs.jsonl", total_steps=1, logging_steps=1)
    skipped = torch.arange(len(SKIP_REASONS))
    for content, context in [(0.5, 2.0), (0.25, 4.0)]:
        terms = {"content": torch.tensor(content), "context": torch.tensor(context)}
        terms["total"] = terms["content"] + 0.1 * terms["context"]
        progress.add_micro_batch(terms, batch_size=3, skipped=skipped)
    record = progress.end_update(epoch=0, lr=1e-3)
    progress.close()
    assert sorted(str(tensor.dtype) for tensor in accelerator.reduced) == ["torch.float32", "torch.int64"]
    assert record["loss/content"] == pytest.approx(0.375) and record["loss/context"] == pytest.approx(3.0)
    assert record["loss/total"] == pytest.approx(0.375 + 0.3)
    assert record["images_seen"] == 6 and record["skipped_total"] == 2 * sum(range(len(SKIP_REASONS)))
    assert set(LOSS_NAMES) == {"content", "context", "total"}


def test_saved_model_copies_the_text_tower_of_a_declip_start(tmp_path, tiny_clip_dir):
    start = tmp_path / "declip_start"
    DeCLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(start)
    CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir).save_pretrained(start / "text_encoder")
    AutoTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(start / "text_encoder")
    student = DeCLIPVisionModel.from_pretrained(start, decoupled_attention="csa")
    save_model(student, tmp_path / "model", str(start), alpha=1.0, student_size=STUDENT_SIZE)

    text = CLIPTextModelWithProjection.from_pretrained(tmp_path / "model" / "text_encoder")
    start_text = CLIPTextModelWithProjection.from_pretrained(start / "text_encoder").state_dict()
    assert text.state_dict().keys() == start_text.keys()
    for name, value in text.state_dict().items():
        assert torch.equal(value, start_text[name]), name
    assert AutoTokenizer.from_pretrained(tmp_path / "model" / "text_encoder")("a cat").input_ids

    vision_only = tmp_path / "vision_only"
    DeCLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(vision_only)
    save_model(student, tmp_path / "model_without_text", str(vision_only), alpha=1.0, student_size=STUDENT_SIZE)
    assert not (tmp_path / "model_without_text" / "text_encoder").exists()


def test_weight_decay_only_on_matrices(tiny_clip_dir):
    student = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="all")
    configure_trainable(student)
    decay, no_decay = parameter_groups(student, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    for name, parameter in student.named_parameters():
        in_decay, in_no_decay = id(parameter) in ids(decay["params"]), id(parameter) in ids(no_decay["params"])
        if not parameter.requires_grad:
            assert not in_decay and not in_no_decay, name
        elif name.endswith(".weight") and ("_proj." in name or ".fc" in name):
            assert in_decay and not in_no_decay, name  # the linear layers' matrices
        else:
            assert in_no_decay and not in_decay, name  # biases and layer norm weights


def _warmup_cosine(update: int, warmup: int, total: int, lr: float) -> float:
    if update < warmup:
        return lr * update / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (update - warmup) / (total - warmup)))


@pytest.mark.parametrize("num_processes", [1, 2, 4])
def test_prepared_scheduler_spans_warmup_and_total_in_updates(num_processes, monkeypatch):
    """Accelerate's wrapper steps the scheduler once per process each update; build_scheduler compensates."""

    class FakeState:  # what AcceleratedScheduler reads; a real multi-process run is checked below
        def __init__(self):
            self.num_processes = num_processes

    monkeypatch.setattr("accelerate.scheduler.AcceleratorState", FakeState)
    GradientState._reset_state()
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    optimizer.step_was_skipped = False  # set by Accelerate's optimizer wrapper
    scheduler = AcceleratedScheduler(build_scheduler(optimizer, 3, 10, num_processes), optimizer)
    for update in range(1, 11):
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(_warmup_cosine(update, 3, 10, 1e-3), abs=1e-12)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------------ arguments, start-up


def test_yaml_config_keys_are_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("student: a\nlr: 3.0e-4\nbetas: [0.8, 0.9]\ngradient_checkpointing: true\nmax_steps: 7\n")
    args = distill.parse_args(["--config", str(config), "--lr", "1e-3", "--no-gradient_checkpointing"])
    assert (args.student, args.lr, args.betas, args.gradient_checkpointing, args.max_steps) == ("a", 1e-3,
                                                                                              [0.8, 0.9], False, 7)
    config.write_text("learning_rate: 1\n")
    with pytest.raises(SystemExit):
        distill.parse_args(["--config", str(config)])


def test_every_flag_has_help():
    parser = distill.build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    assert "--ensemble_alpha" in parser.format_help()  # renders (a stray % in a help text would raise here)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    """12 images (10 usable, one truncated and one 5 px) in two parquet shards."""
    folder = tmp_path_factory.mktemp("images")
    write_image_shards(folder, num_images=12, num_shards=2)
    return folder


@pytest.fixture(scope="module")
def single_shard(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images_one_shard")
    write_image_shards(folder, num_images=14, num_shards=1, seed=3)
    return folder


def _base_argv(clip, dinov2, images, output_dir) -> list:
    return ["--student", clip, "--vfm", dinov2, "--dataset", images, "--student_size", STUDENT_SIZE,
            "--output_dir", output_dir, "--dataloader_num_workers", 0, "--report_to", "none", "--shuffle_buffer", 4,
            # one parquet shard at a time into the buffer: no 5 s pause of datasets' threaded reader after each pass
            "--shuffle_input_shards", 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--student_size", 62], "not a multiple of the student's patch size 4"),
        (["--vfm", "CLIP"], "the context teacher must be one of dinov2"),
        (["--image_column", "picture"], "no column 'picture'"),
        (["--decoupled_attention", "vanilla"], "invalid choice: 'vanilla'"),
        (["--ensemble_alpha", 1.5], "ensemble_alpha must be in"),
        (["--max_steps", None], "give --max_steps, or --images_per_epoch"),
        (["--compile_backend", "inductr"], "unknown --compile_backend 'inductr'"),
    ],
)
def test_bad_values_fail_at_start_before_any_model(change, message, tiny_clip_dir, tiny_dinov2_dir, image_shards,
                                                    tmp_path, monkeypatch, capsys):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(distill, "build_models", no_models)
    argv = _base_argv(tiny_clip_dir, tiny_dinov2_dir, image_shards, tmp_path / "run") + ["--max_steps", 2]
    flag = change[0]
    if change[1] is None:  # drop the flag
        index = argv.index(flag)
        del argv[index : index + 2]
    else:
        argv += [flag, tiny_clip_dir if change[1] == "CLIP" else change[1]]
    with pytest.raises(SystemExit) as exit_info:
        distill.main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_value_in_the_config_file_is_checked_like_a_flag(tmp_path, tiny_clip_dir, tiny_dinov2_dir, image_shards,
                                                             capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"student: {tiny_clip_dir}\nvfm: {tiny_dinov2_dir}\ndataset: {image_shards}\n"
                      f"decoupled_attention: qk\nmax_steps: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        distill.main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'qk'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ two processes


def _launch(argv: list, processes: int, port: int, cpu: bool = True, python_path: tuple = (),
            timeout: float = 400) -> subprocess.CompletedProcess:
    """A real `accelerate launch` of distill.py with `processes` CPU processes (DDP over gloo). `accelerate launch
    --cpu --num_processes 2` would start ONE process; --multi_gpu with ACCELERATE_USE_CPU=1 starts them all.
    `cpu=False` leaves that switch off on a machine without GPUs (the launcher then starts processes Accelerate does
    not join). `python_path` folders go before the repository on PYTHONPATH (e.g. one holding a test's
    sitecustomize.py, which every process runs at start-up)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "training/distill.py", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, (*python_path, REPO_ROOT)))}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a machine without GPUs, wherever the test runs
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_clip_dir, tiny_dinov2_registers_dir, image_shards) -> Path:
    """A real `accelerate launch` with two CPU processes (DDP over gloo) for 4 updates, across an epoch end."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    argv = _base_argv(tiny_clip_dir, tiny_dinov2_registers_dir, image_shards, run_dir) + [
        "--max_steps", 4, "--per_device_batch_size", 2, "--lr", 2e-3, "--warmup_steps", 2, "--logging_steps", 1,
        "--checkpointing_steps", 2, "--ensemble_alpha", 0.7, "--log_image_hashes", "--decoupled_attention", "csa"]
    result = _launch(argv, processes=2, port=29531)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir


def test_two_processes_train_distributed_on_disjoint_images(two_process_run):
    logs = _logs(two_process_run)
    assert [record["step"] for record in logs] == [1, 2, 3, 4]
    assert all(record["world_size"] == 2 for record in logs)
    traces = [(two_process_run / "debug" / f"image_hashes_rank{rank}.txt").read_text().split("\n")[:-1]
              for rank in range(2)]
    by_epoch = [{} for _ in range(2)]
    for rank, lines in enumerate(traces):
        assert lines, f"rank {rank} trained on nothing"
        for line in lines:
            epoch, digest = line.split("\t")
            by_epoch[rank].setdefault(epoch, set()).add(digest)
    for epoch in set(by_epoch[0]) | set(by_epoch[1]):
        assert not by_epoch[0].get(epoch, set()) & by_epoch[1].get(epoch, set()), f"epoch {epoch}"
    # 5 usable images per rank (one shard each) in batches of 2: 3 batches an epoch, so 4 updates cross into epoch 1.
    assert {"0", "1"} <= set(by_epoch[0])
    assert logs[-1]["images_seen"] == sum(len(lines) for lines in traces)


def test_two_process_run_counts_the_unusable_images(two_process_run):
    summary = json.loads((two_process_run / "training_args.json").read_text())["summary"]
    # A whole epoch was read on both ranks: each holds one of the NUM_BAD_IMAGES bad ones.
    assert summary["skipped"]["truncated"] >= 1 and summary["skipped"]["tiny"] >= 1
    assert sum(summary["skipped"].values()) >= NUM_BAD_IMAGES
    assert summary["steps"] == 4 and summary["world_size"] == 2


def test_two_process_schedule_counts_updates(two_process_run):
    lr = 2e-3 * (2 * 2) / 16  # linear scaling from the reference total batch of 16
    for record in _logs(two_process_run):
        assert record["lr"] == pytest.approx(_warmup_cosine(record["step"], 2, 4, lr), abs=1e-12)


def test_saved_model_is_the_ensemble_of_trained_and_starting_weights(two_process_run, tiny_clip_dir):
    saved = DeCLIPVisionModel.from_pretrained(two_process_run / "model")
    start = DeCLIPVisionModel.from_pretrained(tiny_clip_dir)
    assert saved.config.decoupled_attention == "csa"
    # The last checkpoint holds the live student (inside DenseStudent) at the final step.
    trained = load_file(two_process_run / "checkpoints" / "checkpoint-4" / "model.safetensors")
    start_state, saved_state = start.state_dict(), saved.state_dict()
    changed = 0
    for name, value in saved_state.items():
        expected = 0.7 * trained[f"model.{name}"] + 0.3 * start_state[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        changed += not torch.equal(value, start_state[name])
    assert changed > 0
    assert torch.equal(saved_state["embeddings.patch_embedding.weight"], start_state["embeddings.patch_embedding.weight"])


def test_saved_folder_is_self_sufficient(two_process_run, tiny_clip_dir):
    folder = two_process_run / "model"
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__name__ == "DeCLIPVisionModel"
    processor = CLIPImageProcessor.from_pretrained(folder)
    # The processor serves the model's own input size (the pipeline and the forward); training's is recorded.
    side = remote.config.image_size
    assert processor.crop_size == {"height": side, "width": side} and processor.declip_training_size == STUDENT_SIZE
    assert "longest side" in processor.declip_note
    text = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
    start_text = CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir)
    for (name, value), start_value in zip(text.state_dict().items(), start_text.state_dict().values()):
        assert torch.equal(value, start_value), name
    record = json.loads((two_process_run / "training_args.json").read_text())
    # The launcher's flags are rebuilt from what Accelerate reports (they are not in the script's argv).
    assert record["command"].startswith("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 "
                                        "training/distill.py")
    assert record["launch"]["num_processes"] == 2 and record["launch"]["mixed_precision"] == "no"
    assert record["args"]["mixed_precision"] == "no"  # the effective precision, not the unset flag
    assert record["args"]["ensemble_alpha"] == 0.7 and record["args"]["decoupled_attention"] == "csa"
    assert set(record["versions"]) == {"torch", "transformers", "accelerate", "datasets", "declip_hf"}
    assert set(record["summary"]["final_losses"]) == {"content", "context", "total"}


# ------------------------------------------------------------------------------------------------ resume, learning


def _resume_argv(tiny_clip_dir, tiny_dinov2_dir, single_shard, run_dir) -> list:
    return _base_argv(tiny_clip_dir, tiny_dinov2_dir, single_shard, run_dir) + [
        "--max_steps", 10, "--per_device_batch_size", 3, "--lr", 3e-3, "--lr_scaling", "none", "--warmup_steps", 2,
        "--logging_steps", 1, "--checkpointing_steps", 5, "--context_weight", 1.0, "--seed", 5]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, tiny_clip_dir, tiny_dinov2_dir, single_shard) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    _run_in_process(_resume_argv(tiny_clip_dir, tiny_dinov2_dir, single_shard, run_dir))
    return run_dir


def test_resumed_run_continues_exactly(uninterrupted_run, tiny_clip_dir, tiny_dinov2_dir, single_shard, tmp_path):
    run_dir = tmp_path / "interrupted"
    argv = _resume_argv(tiny_clip_dir, tiny_dinov2_dir, single_shard, run_dir)
    # 12 usable images in batches of 3: 4 updates an epoch. Stop at the very end of epoch 0 (the resumed epoch has
    # nothing left), then in the middle of epoch 1 (between two saves: the stop itself must checkpoint), then finish.
    first = _run_in_process(argv + ["--stop_after_steps", 4])
    assert first["steps"] == 4 and not first["finished"]
    assert (run_dir / "checkpoints" / "checkpoint-4" / "COMPLETED").exists()
    middle = _run_in_process(argv + ["--stop_after_steps", 6, "--resume_from_checkpoint", "latest"])
    assert middle["steps"] == 6 and (run_dir / "checkpoints" / "checkpoint-6" / "COMPLETED").exists()
    second = _run_in_process(argv + ["--resume_from_checkpoint", "latest"])
    assert second["steps"] == 10 and second["finished"]

    expected = {record["step"]: record for record in _logs(uninterrupted_run)}
    resumed = _logs(run_dir)
    assert [record["step"] for record in resumed] == list(range(1, 11))
    for record in resumed:
        reference = expected[record["step"]]
        for key in ("loss/content", "loss/context", "loss/total", "lr", "images_seen", "epoch"):
            assert record[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), (record["step"], key)
    assert second["skipped"] == json.loads((uninterrupted_run / "training_args.json").read_text())["summary"]["skipped"]
    final = DeCLIPVisionModel.from_pretrained(run_dir / "model").state_dict()
    for name, value in DeCLIPVisionModel.from_pretrained(uninterrupted_run / "model").state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-6)


def test_latest_ignores_an_incomplete_checkpoint(uninterrupted_run):
    from training.checkpointing import COMPLETED_MARKER, resolve_resume

    checkpoints = uninterrupted_run / "checkpoints"
    assert resolve_resume("latest", checkpoints).name == "checkpoint-10"
    broken = checkpoints / "checkpoint-99"
    broken.mkdir()
    assert resolve_resume("latest", checkpoints).name == "checkpoint-10"
    with pytest.raises(ValueError, match=COMPLETED_MARKER):
        resolve_resume(str(broken), checkpoints)
    broken.rmdir()


def test_short_run_lowers_held_out_losses(uninterrupted_run, tiny_clip_dir, tiny_dinov2_dir):
    batch = _batch(4, seed=99)  # images the run never saw
    teacher = FrozenCLIPTeacher(DeCLIPVisionModel.from_pretrained(tiny_clip_dir))
    vfm = ContextTeachers([FrozenVFM(AutoModel.from_pretrained(tiny_dinov2_dir))], ["vfm"])
    loss_fn = DeCLIPLoss(context_weight=1.0)

    def held_out_losses(checkpoint) -> dict[str, float]:
        student = DeCLIPVisionModel.from_pretrained(checkpoint, decoupled_attention="qq").eval()
        with torch.no_grad():
            terms = distill.training_step(batch, distill.DenseStudent(student), teacher, vfm, loss_fn,
                                          Accelerator(cpu=True))
        return {name: value.item() for name, value in terms.items()}

    before, after = held_out_losses(tiny_clip_dir), held_out_losses(uninterrupted_run / "model")
    assert after["content"] < 0.8 * before["content"], (before, after)
    assert after["context"] < before["context"], (before, after)


# ------------------------------------------------------------------------------------------------ shipped configs


def test_tiny_config_makes_its_assets_trains_and_saves(tmp_path, monkeypatch):
    """The README's main command, in-process: configs/tiny.yaml as shipped, from an empty folder."""
    monkeypatch.chdir(tmp_path)  # the config's relative paths (assets, outputs) land here
    summary = _run_in_process(["--config", REPO_ROOT / "configs" / "tiny.yaml", "--report_to", "none"])
    assert summary["finished"] and summary["steps"] == 60
    assert summary["skipped"]["truncated"] >= 1 and summary["skipped"]["tiny"] >= 1
    model = DeCLIPVisionModel.from_pretrained(tmp_path / "outputs" / "tiny" / "model")
    assert model.get_dense_features(torch.randn(1, 3, STUDENT_SIZE, STUDENT_SIZE)).dense_embeds.shape == (1, 24, 16, 16)
    # A newcomer runs the demo again: it starts over in its folder instead of refusing it (a shorter run here).
    again = _run_in_process(["--config", REPO_ROOT / "configs" / "tiny.yaml", "--report_to", "none", "--max_steps", "2",
                             "--warmup_steps", "1"])
    assert again["finished"] and again["steps"] == 2


def test_real_recipe_config_holds_the_reference_hyper_parameters():
    args = distill.parse_args(["--config", str(REPO_ROOT / "configs" / "declip_vitb16_coco.yaml")])
    assert (args.student, args.vfm) == ("openai/clip-vit-base-patch16", "facebook/dinov2-base")
    assert (args.student_size, args.max_split, args.max_crops) == (560, 6, 20)
    assert (args.content_weight, args.context_weight) == (1.0, 0.1)
    assert (args.lr, args.lr_scaling, args.weight_decay, args.betas, args.eps) == (1e-5, "linear", 0.1, [0.9, 0.98],
                                                                                    1e-6)
    assert (args.warmup_steps, args.epochs, args.max_steps, args.per_device_batch_size) == (1000, 6, None, 2)
    assert args.ensemble_alpha == 0.7 and args.image_column == "image"


# ------------------------------------------------------------------------------------------------ teachers, ensembles,
# ablations (docs/method.md §9-§10)


def _teacher_argv(assets: Path, run_dir: Path, *teachers: str, steps: int = 12) -> list:
    argv = _base_argv(assets / "clip", assets / teachers[0], assets / "images", run_dir)
    argv[argv.index("--vfm") + 1 : argv.index("--vfm") + 2] = [assets / teacher for teacher in teachers]
    return argv + ["--max_steps", steps, "--per_device_batch_size", 4, "--lr", 2e-3, "--lr_scaling", "none",
                   "--warmup_steps", 2, "--logging_steps", 4, "--context_weight", 1.0]


def _held_out_context(model_dir, teacher_dir: Path, mode: str = "qq") -> float:
    """The context loss of `model_dir` on images no run saw, against one teacher at its own patch size."""
    vfm = FrozenVFM(AutoModel.from_pretrained(teacher_dir))
    config = ViewConfig(student_size=STUDENT_SIZE, student_patch=4, teacher_size=32, vfm_patch=vfm.patch_size,
                        max_crops=8)
    rng = np.random.default_rng(99)
    examples = [make_views(to_rgb(synthetic_image(index, rng)), config, random.Random(index)) for index in range(4)]
    student = DeCLIPVisionModel.from_pretrained(model_dir, decoupled_attention=mode).eval()
    with torch.no_grad():
        dense = student.get_dense_features(torch.stack([example["student"] for example in examples]))
        vfm_map = vfm(torch.stack([example["vfm"] for example in examples]))
    return context_loss(dense.context_features, (16, 16), vfm_map).item()


@pytest.mark.parametrize("teacher", ["dino", "sam"])
def test_each_teacher_trains_the_tiny_default_and_its_held_out_context_loss_falls(teacher, tiny_assets, tmp_path):
    run_dir = tmp_path / teacher
    summary = _run_in_process(_teacher_argv(tiny_assets, run_dir, teacher))
    assert summary["finished"] and summary["steps"] == 12
    before = _held_out_context(tiny_assets / "clip", tiny_assets / teacher)
    after = _held_out_context(run_dir / "model", tiny_assets / teacher)
    assert after < 0.9 * before, (before, after)


def test_ensemble_flags_are_checked_at_start(tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distill, "build_models", lambda *args, **kwargs: pytest.fail("a model was built"))
    argv = _teacher_argv(tiny_assets, tmp_path / "run", "dinov2", "sam")
    cases = [(["--vfm_weights", 0.7], "--vfm_weights has 1 value(s) for 2 --vfm teacher(s)"),
             (["--vfm_weights", 0.7, -0.3], "--vfm_weights must be finite numbers >= 0, got [0.7, -0.3]"),
             (["--vfm_weights", 0, 0], "--vfm_weights are all 0"),
             (["--vfm", tiny_assets / "dinov2", tiny_assets / "clip"], "the context teacher must be one of")]
    for change, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            distill.main([str(arg) for arg in argv + change])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


def test_clipself_loads_no_vfm_has_no_context_term_and_saves_the_maskclip_path(tiny_assets, tmp_path, monkeypatch,
                                                                               capsys):
    loaded = []
    original = distill.AutoModel.from_pretrained
    monkeypatch.setattr(distill.AutoModel, "from_pretrained", lambda name, *a, **k: loaded.append(name) or
                        original(name, *a, **k))
    run_dir = tmp_path / "clipself"
    # The teacher flags of a shared config are ignored, and the records say so.
    summary = _run_in_process(_teacher_argv(tiny_assets, run_dir, "dinov2", steps=4) + ["--ablation", "clipself"])
    assert loaded == [] and summary["finished"]
    assert "--ablation clipself trains the maskclip path without a VFM; ignoring --vfm" in capsys.readouterr().err
    assert set(summary["final_losses"]) == {"content", "total"}
    assert all("loss/context" not in record for record in _logs(run_dir))
    args = json.loads((run_dir / "training_args.json").read_text())["args"]
    assert (args["ablation"], args["vfm"], args["decoupled_attention"]) == ("clipself", None, "maskclip")
    assert DeCLIPVisionModel.from_pretrained(run_dir / "model").config.decoupled_attention == "maskclip"


def test_coupled_trains_and_saves_the_vanilla_path(tiny_assets, tmp_path):
    run_dir = tmp_path / "coupled"
    summary = _run_in_process(_teacher_argv(tiny_assets, run_dir, "dinov2", steps=4) + ["--ablation", "coupled"])
    assert summary["finished"] and set(summary["final_losses"]) == {"content", "context", "total"}
    assert DeCLIPVisionModel.from_pretrained(run_dir / "model").config.decoupled_attention == "vanilla"
    identity = json.loads((run_dir / "training_args.json").read_text())["run_identity"]
    assert (identity["ablation"], identity["decoupled_attention"]) == ("coupled", "vanilla")


@pytest.mark.parametrize("scheme, mode, mlp_gets_both", [("coupled", "vanilla", True), ("none", "qq", False)])
def test_coupled_backpropagates_both_losses_into_the_same_tokens(scheme, mode, mlp_gets_both, tiny_clip_dir,
                                                                 tiny_dinov2_dir):
    """Without decoupling the content and context losses both reach the last layer's MLP (the tokens they share);
    decoupled, neither does (docs/method.md §10)."""
    from training.losses import TRAINING_SCHEMES

    teacher = FrozenCLIPTeacher(DeCLIPVisionModel.from_pretrained(tiny_clip_dir))
    vfm = ContextTeachers([FrozenVFM(AutoModel.from_pretrained(tiny_dinov2_dir))], ["vfm"])
    batch = _batch(2, seed=4)
    for weights in ((1.0, 0.0), (0.0, 1.0)):  # content alone, context alone
        student = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention=mode)
        terms = distill.training_step(batch, distill.DenseStudent(student), teacher, vfm, DeCLIPLoss(*weights),
                                      Accelerator(cpu=True), TRAINING_SCHEMES[scheme].context_of)
        terms["total"].backward()
        grad = student.encoder.layers[-1].mlp.fc1.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == mlp_gets_both, weights


def _launch_two_processes(argv: list, port: int) -> None:
    result = _launch(argv, processes=2, port=port)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_two_processes_train_with_sam(tiny_assets, tmp_path):
    run_dir = tmp_path / "sam"
    _launch_two_processes(_teacher_argv(tiny_assets, run_dir, "sam", steps=3) + ["--logging_steps", 1,
                                                                                 "--per_device_batch_size", 2], 29547)
    logs = _logs(run_dir)
    assert [record["step"] for record in logs] == [1, 2, 3] and logs[-1]["world_size"] == 2
    assert all(math.isfinite(record["loss/context"]) for record in logs)
    assert DeCLIPVisionModel.from_pretrained(run_dir / "model").config.decoupled_attention == "qq"


def test_two_processes_train_a_two_teacher_ensemble(tiny_assets, tmp_path):
    """DINO (patch 2, a 32 px view) and SAM (patch 4, a 64 px view), weighted 0.7 / 0.3, each term logged."""
    run_dir = tmp_path / "ensemble"
    argv = _teacher_argv(tiny_assets, run_dir, "dino", "sam", steps=3) + [
        "--vfm_weights", 0.7, 0.3, "--logging_steps", 1, "--per_device_batch_size", 2]
    _launch_two_processes(argv, 29542)
    logs = _logs(run_dir)
    assert [record["step"] for record in logs] == [1, 2, 3] and logs[-1]["world_size"] == 2
    for record in logs:
        dino, sam = record["loss/context/dino"], record["loss/context/sam"]
        assert record["loss/context"] == pytest.approx(0.7 * dino + 0.3 * sam, rel=1e-5)
    record = json.loads((run_dir / "training_args.json").read_text())
    assert record["args"]["vfm"] == [str(tiny_assets / "dino"), str(tiny_assets / "sam")]
    assert record["run_identity"]["vfm_weights"] == [0.7, 0.3]


ABLATION_CONFIGS = {  # file -> (vfm, vfm_weights, ablation, decoupled_attention): what each row of the paper changes
    "clipself": (None, None, "clipself", "maskclip"),
    "coupled": ("facebook/dinov2-with-registers-base", None, "coupled", "vanilla"),
    "dino_b8": ("facebook/dino-vitb8", None, "none", "qq"),
    "dino_b16": ("facebook/dino-vitb16", None, "none", "qq"),
    "sam_b": ("facebook/sam-vit-base", None, "none", "qq"),
    "sam_l": ("facebook/sam-vit-large", None, "none", "qq"),
    "dinov2_b_reg": ("facebook/dinov2-with-registers-base", None, "none", "qq"),
    "dinov2_l_reg": ("facebook/dinov2-with-registers-large", None, "none", "qq"),
    "ensemble_dinov2_sam": (["facebook/dinov2-with-registers-base", "facebook/sam-vit-base"], [0.7, 0.3], "none",
                            "qq"),
}


def test_ablation_configs_are_the_recipe_with_only_the_teacher_changed():
    """configs/ablations/*.yaml rerun the paper's Table 1 and Table 6 rows: each is the recipe, one file apart."""
    assert {path.stem for path in (REPO_ROOT / "configs" / "ablations").glob("*.yaml")} == set(ABLATION_CONFIGS)
    recipe = vars(distill.parse_args(["--config", str(REPO_ROOT / "configs" / "declip_vitb16_coco.yaml")]))
    teacher_keys = ("vfm", "vfm_weights", "ablation", "decoupled_attention")
    for name, expected in ABLATION_CONFIGS.items():
        path = REPO_ROOT / "configs" / "ablations" / f"{name}.yaml"
        args = vars(distill.parse_args(["--config", str(path)]))
        assert tuple(args[key] for key in teacher_keys) == expected, name
        assert args["output_dir"] == f"outputs/ablations/{name}"
        changed = {key for key in recipe if recipe[key] != args[key]} - {"config", "output_dir", *teacher_keys}
        assert not changed, (name, changed)
        assert f"--config configs/ablations/{name}.yaml" in path.read_text()


NO_CPP_COMPILER = not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "clang++"))


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        NO_CPP_COMPILER, reason="inductor compiles C++ on the CPU and no C++ compiler is installed (.ci/run installs "
        "g++ from Debian)")),
])
def test_compiled_run_trains_as_the_eager_run(backend, uninterrupted_run, tiny_clip_dir, tiny_dinov2_dir,
                                              single_shard, tmp_path):
    """--compile compiles the student, the content teacher and the context teacher in place: the run logs the eager
    run's losses (to float rounding) and saves a model with the same keys and weights. Two backends: aot_eager
    (quick; traces forward and backward as inductor does) and inductor, the default, which also generates kernels."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_dir = tmp_path / "compiled"
    argv = _resume_argv(tiny_clip_dir, tiny_dinov2_dir, single_shard, run_dir)
    result = _run_in_process(argv + ["--compile", "--compile_backend", backend])
    assert result["finished"] and result["steps"] == 10
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # student, teacher and VFM were compiled
    expected = {record["step"]: record for record in _logs(uninterrupted_run)}
    for record in _logs(run_dir):
        for key in ("loss/content", "loss/context", "loss/total"):
            assert record[key] == pytest.approx(expected[record["step"]][key], rel=1e-4), (record["step"], key)
    final = DeCLIPVisionModel.from_pretrained(run_dir / "model").state_dict()
    reference = DeCLIPVisionModel.from_pretrained(uninterrupted_run / "model").state_dict()
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=1e-4)
    torch._dynamo.reset()


def test_compiling_is_not_part_of_the_runs_identity():
    """A run may be resumed with or without --compile, or from a checkpoint saved before the flag existed: compiled
    kernels compute the same step, rounding aside."""
    import argparse
    from types import SimpleNamespace

    from training.run_folder import run_identity

    accelerator = SimpleNamespace(num_processes=1, mixed_precision="no")
    eager = run_identity(argparse.Namespace(lr=1e-3, compile=False, compile_backend="inductor"), accelerator)
    compiled = run_identity(argparse.Namespace(lr=1e-3, compile=True, compile_backend="aot_eager"), accelerator)
    assert eager == compiled == {"lr": 1e-3, "num_processes": 1, "mixed_precision": "no"}
