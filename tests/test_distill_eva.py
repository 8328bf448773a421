"""Distillation with an EVA02-CLIP student (docs/method.md §8): the trainable set, gradients, and the tiny default."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

from declip_hf import TRAINABLE_ATTENTION_MODES, DeCLIPEvaVisionModel, DeCLIPSegmenter
from tests.conftest import REPO_ROOT
from tests.test_distill import _assert_one_step_reaches_exactly, _base_argv, _launch, _logs, _run_in_process
from training import distill
from training.optim import configure_trainable
from training.teachers import ContextTeachers, FrozenCLIPTeacher, FrozenVFM


def _expected_frozen(name: str, mode: str) -> bool:
    """§5's rule plus the EVA02 last block's parts the decoupled path never reads (q's bias travels with q)."""
    if not name.startswith("blocks."):
        return True  # patch embedding, cls token, position embedding, final norm, head
    if not name.startswith("blocks.1."):
        return False
    unused = {"qq": ["k_proj"], "kk": ["q_proj", "q_bias"], "vv": ["q_proj", "q_bias", "k_proj"], "csa": [], "all": []}
    return ".mlp." in name or ".norm2." in name or any(f".attn.{part}" in name for part in unused[mode])


@pytest.mark.parametrize("mode", TRAINABLE_ATTENTION_MODES)
def test_eva_trainable_set_and_every_trainable_parameter_gets_a_gradient(mode, tiny_eva_dir, tiny_dinov2_dir):
    student = DeCLIPEvaVisionModel.from_pretrained(tiny_eva_dir, decoupled_attention=mode)
    trainable = set(configure_trainable(student))
    assert trainable == {name for name, _ in student.named_parameters() if not _expected_frozen(name, mode)}

    teacher = FrozenCLIPTeacher(DeCLIPEvaVisionModel.from_pretrained(tiny_eva_dir))
    vfm = ContextTeachers([FrozenVFM(AutoModel.from_pretrained(tiny_dinov2_dir))], ["vfm"])
    _assert_one_step_reaches_exactly(student, trainable, teacher, vfm)


def test_tiny_eva_config_makes_its_assets_trains_and_saves(tmp_path, monkeypatch):
    """configs/tiny_eva.yaml as shipped (shortened), from an empty folder: the EVA02 student trains and is saved as one."""
    monkeypatch.chdir(tmp_path)
    summary = _run_in_process(["--config", REPO_ROOT / "configs" / "tiny_eva.yaml", "--report_to", "none",
                               "--max_steps", 6, "--warmup_steps", 1, "--checkpointing_steps", 3])
    assert summary["finished"] and summary["steps"] == 6
    saved = tmp_path / "outputs" / "tiny_eva" / "model"
    model = AutoModel.from_pretrained(saved)
    assert type(model) is DeCLIPEvaVisionModel and model.config.decoupled_attention == "csa"
    assert model.get_dense_features(torch.randn(1, 3, 64, 64)).dense_embeds.shape == (1, 24, 16, 16)
    start = load_file(tmp_path / "outputs" / "tiny_assets" / "eva" / "model.safetensors")
    trained = load_file(saved / "model.safetensors")
    assert torch.equal(trained["patch_embed.proj.weight"], start["patch_embed.proj.weight"])  # frozen (§5)
    assert not torch.equal(trained["blocks.1.attn.q_proj.weight"], start["blocks.1.attn.q_proj.weight"])  # trained
    # The start's text tower travels with it, so the trained folder segments as it is.
    with torch.no_grad():
        output = DeCLIPSegmenter.from_pretrained(saved)([Image.new("RGB", (48, 40), (20, 160, 40))], ["grass", "sky"])
    assert output.label_maps[0].shape == (40, 48)


def test_two_processes_train_an_eva_student(tiny_assets, tmp_path):
    """A real 2-process `accelerate launch` (DDP over gloo) with the EVA02 student: DDP requires every trainable
    parameter to get a gradient, which the EVA trainable set must satisfy."""
    run_dir = tmp_path / "run"
    argv = _base_argv(tiny_assets / "eva", tiny_assets / "dinov2", tiny_assets / "images", run_dir) + [
        "--max_steps", 2, "--per_device_batch_size", 2, "--lr", 2e-3, "--warmup_steps", 1, "--logging_steps", 1,
        "--decoupled_attention", "csa", "--ensemble_alpha", 0.7]
    result = _launch(argv, processes=2, port=29571)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert [record["step"] for record in _logs(run_dir)] == [1, 2] and _logs(run_dir)[-1]["world_size"] == 2
    assert type(AutoModel.from_pretrained(run_dir / "model")) is DeCLIPEvaVisionModel


def test_eva_recipe_config_holds_the_authors_hyper_parameters():
    """configs/declip_eva02_b16_coco.yaml: the authors' scripts/dist_DeCLIP_eva_vitb16_coco.sh."""
    args = distill.parse_args(["--config", str(REPO_ROOT / "configs" / "declip_eva02_b16_coco.yaml")])
    assert (args.student, args.vfm) == ("outputs/eva02_clip_b16", "facebook/dinov2-base")
    assert (args.student_size, args.decoupled_attention, args.content_weight, args.context_weight) == (560, "qq", 1.0, 0.1)
    assert (args.lr, args.lr_scaling, args.weight_decay, args.warmup_steps, args.epochs) == (1e-5, "linear", 0.1, 1000, 6)
    assert (args.per_device_batch_size, args.ensemble_alpha, args.num_trainable_layers) == (4, 0.7, None)
