"""Model card and release command: a tiny training run becomes a release folder whose card snippets run offline
under the card's repo id, and whose push is checked up to the network call."""

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from declip_hf import DeCLIPVisionConfig, DeCLIPVisionModel
from declip_hf.hub import release
from declip_hf.hub.model_card import (
    PAPER_SEGMENTATION_AVERAGE_MIOU,
    PAPER_SEGMENTATION_MIOU,
    PROJECT_URL,
    TrainingRun,
    build_model_card,
    region_rows,
    segmentation_rows,
)
from declip_hf.segmentation.benchmarks import SEGMENTATION_BENCHMARKS
from training.export import image_processor_for

REPO_ID = "declip-test/tiny-declip"
REPO_ROOT = Path(__file__).resolve().parents[1]

TRAINING_ARGS = {
    "student": None,  # the tiny CLIP's path, filled in by build_tiny_run
    "vfm": "facebook/dinov2-base",
    "dataset": "detection-datasets/coco",
    "decoupled_attention": "csa",
    "student_size": 64,
    "teacher_size": 32,
    "max_split": 3,
    "max_crops": 5,
    "content_weight": 1.0,
    "context_weight": 0.1,
    "learning_rate": 1e-5,
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "adam_epsilon": 1e-6,
    "warmup_steps": 2,
    "num_epochs": 1,
    "max_steps": 3,
    "per_device_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "ensemble_alpha": 0.7,
    "seed": 1234,
    "mixed_precision": "bf16",
}

RESULTS = {
    "model": "run/model",
    "protocol": "DeCLIP paper settings (short side 448, sliding window 336, stride 112)",
    "benchmarks": {
        "voc21": {
            "mIoU": 12.34,
            "aAcc": 45.6,
            "mAcc": 20.5,
            "per_class_IoU": {"background": 40.0},
            "num_images": 3,
            "skipped": 0,
            "settings": {"logit_scale": 80},
        },
        "coco_object": {
            "mIoU": 3.21,
            "aAcc": 30.1,
            "mAcc": 5.5,
            "per_class_IoU": {"wall": 10.0},
            "num_images": 2,
            "skipped": 1,
            "settings": {"logit_scale": 40},
        },
    },
    "region_classification": {
        "coco_panoptic": {
            "box": {"thing_mAcc": 11.5, "stuff_mAcc": 6.25},
            "mask": {"thing_mAcc": 12.0, "stuff_mAcc": 7.0},
            "num_regions": 17,
            "settings": {"image_size": 560, "protocol": "authors"},
        },
    },
}


def build_tiny_run(run_dir: Path, tiny_clip_dir: Path) -> Path:
    """A training run directory as `accelerate launch training/distill.py` writes it (model/ with the saved
    DeCLIPVisionModel, image processor and text_encoder/, training_args.json, logs.jsonl), from the tiny CLIP with
    its encoder perturbed as training would. Swap in a real tiny training run here when one is cheap enough."""
    torch.manual_seed(1)
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention=TRAINING_ARGS["decoupled_attention"])
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model_dir = run_dir / "model"
    model.save_pretrained(model_dir)
    # As training/export.py saves it: the starting checkpoint's processor at the model's input size, recording the
    # training resolution.
    config = model.config
    processor = image_processor_for(
        str(tiny_clip_dir), config.image_size, TRAINING_ARGS["student_size"], config.patch_size
    )
    processor.save_pretrained(model_dir)
    CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir).save_pretrained(model_dir / "text_encoder")
    AutoTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(model_dir / "text_encoder")
    args = {**TRAINING_ARGS, "student": str(tiny_clip_dir)}
    recorded = {
        "command": "accelerate launch training/distill.py "
        + " ".join(f"--{name} {value}" for name, value in args.items()),
        "args": args,
        "summary": {
            "steps": 3,
            "images_seen": 6,
            "skipped": 1,
            "final_losses": {"content": 0.41, "context": 0.93},
            "elapsed_s": 4.2,
        },
        "versions": {"torch": torch.__version__, "transformers": "5.24.0"},
    }
    (run_dir / "training_args.json").write_text(json.dumps(recorded, indent=2))
    (run_dir / "logs.jsonl").write_text('{"step": 1, "loss": 1.2}\n{"step": 3, "loss": 0.9}\n')
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_clip_dir) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("run"), tiny_clip_dir)


def intercept_hub(monkeypatch) -> list:
    """Intercept only the network layer: the two HfApi calls the release makes, and the token lookup."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'a' * 40}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="a" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(release, "get_token", lambda: "hf_not_a_real_token")
    return calls


@pytest.fixture
def hub_calls(monkeypatch):
    return intercept_hub(monkeypatch)


@pytest.fixture(scope="module")
def released(tiny_run, tmp_path_factory):
    """`release --push` run end to end on the tiny run, the Hub intercepted; returns (folder, calls, stdout)."""
    (tiny_run / "eval_results.json").write_text(json.dumps(RESULTS))
    out = tmp_path_factory.mktemp("release")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed):
        calls = intercept_hub(patch)
        arguments = ["--repo-id", REPO_ID, "--out", str(out), "--push", "--private", "--overwrite", "--license", "mit"]
        code = release.main([str(tiny_run), *arguments])
    assert code == 0, printed.getvalue()
    return out, calls, printed.getvalue()


def _markdown_table_row(name, value) -> str:
    return f"| `{name}` | `{value if isinstance(value, str) else json.dumps(value)}` |"


@pytest.fixture(scope="module")
def vit_b16_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's records with a ViT-B/16 config: what a card (which reads no weights) sees of a run started
    from openai/clip-vit-base-patch16."""
    run_dir = tmp_path_factory.mktemp("vit_b16_run")
    shutil.copy(tiny_run / "training_args.json", run_dir / "training_args.json")
    shutil.copytree(tiny_run / "model" / "text_encoder", run_dir / "model" / "text_encoder")
    shutil.copy(tiny_run / "model" / "preprocessor_config.json", run_dir / "model")
    DeCLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
        hidden_act="quick_gelu",
        decoupled_attention="csa",
    ).save_pretrained(run_dir / "model")
    return run_dir


def test_card_reads_every_training_argument_and_result(vit_b16_run):
    run = TrainingRun.from_dir(vit_b16_run)
    card = build_model_card(run, REPO_ID, "mit", base_model="openai/clip-vit-base-patch16", results=RESULTS)
    text = str(card)
    for name, value in run.args.items():
        shown = "openai/clip-vit-base-patch16" if name == "student" else value  # the local path is not shown
        assert _markdown_table_row(name, shown) in text, name
    assert run.command.replace(run.args["student"], "openai/clip-vit-base-patch16") in text
    assert "| images seen | 6 |" in text and "0.41" in text
    assert "(https://huggingface.co/datasets/detection-datasets/coco)" in text
    # The results sit beside the paper's numbers for the same benchmark.
    assert "| voc21 | 12.34 | 45.60 | 20.50 | 3 | 59.7 |" in text
    assert "| coco_object | 3.21 | 30.10 | 5.50 | 2 | 36.4 |" in text
    assert "| coco_panoptic | 11.50 | 6.25 | 12.00 | 7.00 | 17 | 65.0 / 38.8 |" in text
    assert "The region\ntable above quotes" in text
    assert all(str(value) in text for value in PAPER_SEGMENTATION_MIOU.values())
    assert "EVA02-CLIP" in text and "arXiv" in text and "2505.04410" in text and "@inproceedings" in text
    assert text.count("EVA02-CLIP") == 1  # the caveat is stated once
    assert "| DeCLIP | 59.7 | 35.3 | 36.4 | 85.0 | 32.8 | 39.2 | 21.9 | 25.3 | 41.9 |" in text
    # The processor serves CLIP's 224 px forward; dense use gets the training view at 64 px from the helper.
    assert "CLIP's own 224 px input" in text and "trained at 64 px" in text and "prepare_dense_inputs" in text
    assert f"[`declip-hf`]({PROJECT_URL})" in text and "in a clone of its source" not in text

    metadata = ModelCard(text).data.to_dict()
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-feature-extraction"
    assert metadata["license"] == "mit" and metadata["base_model"] == "openai/clip-vit-base-patch16"
    assert metadata["datasets"] == ["detection-datasets/coco"]
    assert {"custom_code", "declip", "clip", "open-vocabulary", "dense-prediction"} <= set(metadata["tags"])
    reported = {
        (result["dataset"]["name"], metric["name"]): metric["value"]
        for result in metadata["model-index"][0]["results"]
        for metric in result["metrics"]
    }
    assert reported == {
        ("voc21", "mIoU"): 12.34,
        ("coco_object", "mIoU"): 3.21,
        ("coco_panoptic", "thing mAcc (box)"): 11.5,
        ("coco_panoptic", "stuff mAcc (box)"): 6.25,
        ("coco_panoptic", "thing mAcc (mask)"): 12.0,
        ("coco_panoptic", "stuff mAcc (mask)"): 7.0,
    }


def test_card_names_an_ensemble_of_teachers_and_the_content_only_ablation(vit_b16_run):
    run = TrainingRun.from_dir(vit_b16_run)
    run.args.update(vfm=["facebook/dinov2-base", "facebook/sam-vit-base"], vfm_weights=[0.7, 0.3])
    text = str(build_model_card(run, REPO_ID, "mit", base_model="openai/clip-vit-base-patch16"))
    teachers = ("[facebook/dinov2-base](https://huggingface.co/facebook/dinov2-base) (weight 0.7) and "
                "[facebook/sam-vit-base](https://huggingface.co/facebook/sam-vit-base) (weight 0.3)")
    assert f"vision foundation model ({teachers})" in text and "['facebook" not in text
    assert "VFM facebook/dinov2-base, facebook/sam-vit-base" in release.commit_message(run)

    run.args.update(vfm=["/home/me/teachers/dinov2-base", "facebook/sam-vit-base"])
    assert "VFM dinov2-base, facebook/sam-vit-base" in release.commit_message(run)  # no local path is published

    run.args.update(vfm=None, vfm_weights=None, ablation="clipself", decoupled_attention="maskclip")
    text = str(build_model_card(run, REPO_ID, "mit", base_model="openai/clip-vit-base-patch16"))
    intro = text.split("## ")[0]
    assert "ablation (`--ablation clipself`, CLIPSelf's setting)" in intro and "No context teacher" in intro
    assert "without residual" not in intro and "with no context teacher" in text
    assert "None" not in text.split("## Training")[0] and "VFM" not in release.commit_message(run)

    run.args.update(vfm="facebook/dinov2-base", ablation="coupled", decoupled_attention="vanilla")
    intro = str(build_model_card(run, REPO_ID, "mit", base_model="openai/clip-vit-base-patch16")).split("## ")[0]
    assert "(`--ablation coupled`)" in intro and "without decoupling" in intro and "without residual" not in intro


def test_paper_numbers_are_keyed_by_the_built_in_benchmarks():
    assert list(PAPER_SEGMENTATION_MIOU) and set(PAPER_SEGMENTATION_MIOU) == set(SEGMENTATION_BENCHMARKS)
    mean = sum(PAPER_SEGMENTATION_MIOU.values()) / len(PAPER_SEGMENTATION_MIOU)
    assert abs(mean - PAPER_SEGMENTATION_AVERAGE_MIOU["DeCLIP"]) < 0.06  # the paper averages unrounded numbers


def test_segmentation_reference_only_under_the_declip_protocol():
    def paper_column(settings):
        return [row["paper"] for row in segmentation_rows({"benchmarks": {"voc21": {"settings": settings}}})]

    assert paper_column({"protocol": "declip", "pamr_steps": None}) == ["59.7"]
    assert paper_column({}) == ["59.7"]  # results written before the presets: DeCLIP's protocol
    assert paper_column({"protocol": "sclip"}) == ["-"]
    assert paper_column({"protocol": "declip", "pamr_steps": 10}) == ["-"]
    assert paper_column({"protocol": "custom"}) == ["-"]


def test_region_reference_only_where_it_applies():
    def paper_column(results, base_model):
        return [row["paper"] for row in region_rows(results, base_model)]

    openai = "openai/clip-vit-base-patch16"
    assert paper_column(RESULTS, openai) == ["65.0 / 38.8"]
    assert paper_column(RESULTS, "laion/CLIP-ViT-B-16-laion2B-s34B-b88K") == ["n/a"]
    assert paper_column(RESULTS, None) == ["n/a"]
    at_448 = {"region_classification": {"coco_panoptic": {"settings": {"image_size": 448, "protocol": "authors"}}}}
    assert paper_column(at_448, openai) == ["n/a"]
    area_weighted = {"region_classification": {"coco_panoptic": {"settings": {"image_size": 560,
                                                                                "protocol": "area_weighted"}}}}
    assert paper_column(area_weighted, openai) == ["n/a"]  # not the protocol the paper's numbers were measured with
    other = {"region_classification": {"my_regions": {"settings": {"image_size": 560, "protocol": "authors"}}}}
    assert paper_column(other, openai) == ["n/a"]
    assert paper_column({"region_classification": {"coco_panoptic": {}}}, openai) == ["n/a"]  # size unknown


def test_card_without_results_or_hub_student_has_no_model_index(tiny_run):
    card = build_model_card(TrainingRun.from_dir(tiny_run), REPO_ID, "apache-2.0")
    metadata = card.data.to_dict()
    assert "model-index" not in metadata and "base_model" not in metadata  # the student is a local path
    # ... shown by its last component only, and not as a Hub link.
    assert str(tiny_run.parent) not in str(card) and "https://huggingface.co/..." not in str(card)
    assert f"`.../{Path(TrainingRun.from_dir(tiny_run).args['student']).name}`" in str(card)
    assert "No evaluation results were attached" in str(card)
    assert "59.7" in str(card)  # the paper's reference table is always there


def test_release_folder_and_push_payload(released, tiny_run):
    out, calls, printed = released
    assert [call[0] for call in calls] == ["create_repo", "upload_folder"]
    _, repo_id, create_kwargs = calls[0]
    assert repo_id == REPO_ID and create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    _, repo_id, upload = calls[1]
    assert repo_id == REPO_ID and Path(upload["folder_path"]) == out.resolve()
    model_dir = tiny_run / "model"
    saved = [str(path.relative_to(model_dir)) for path in model_dir.rglob("*") if path.is_file()]
    assert upload["files"] == sorted(saved + ["README.md"])
    assert {
        "config.json",
        "model.safetensors",
        "modeling_declip.py",
        "configuration_declip.py",
        "region_pooling.py",
        "preprocessor_config.json",
        "text_encoder/model.safetensors",
        "text_encoder/tokenizer_config.json",
    } <= set(saved)
    assert upload["commit_message"].startswith(f"Release DeCLIP run {tiny_run.name}: ")
    assert "facebook/dinov2-base" in upload["commit_message"] and "3 steps" in upload["commit_message"]
    assert f"revision {'a' * 40}" in printed
    assert "[FAILED]" not in printed and printed.count("[ok]") == 6
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_declip.DeCLIPVisionModel"


def _snippets_by_kind(card_text: str) -> dict[str, str]:
    """Plain reading of the card: each ```python block, keyed by the marker comment just above it."""
    blocks = re.findall(r"<!-- declip-snippet: (\S+) -->\n```python\n(.*?)\n```\n", card_text, re.S)
    assert len(blocks) == card_text.count("```python"), "an unmarked python block"
    scripts = {}
    for kind, code in blocks:
        scripts[kind] = scripts.get(kind, "") + code + "\n\n"
    return scripts


def test_card_snippets_run_unmodified_against_an_offline_hub_cache(released, offline_hub_cache, tmp_path):
    out, _, _ = released
    scripts = _snippets_by_kind((out / "README.md").read_text())
    assert set(scripts) == {"package", "remote-code"}
    assert f'DeCLIPVisionModel.from_pretrained("{REPO_ID}")' in scripts["package"]
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in scripts["remote-code"]
    assert "declip_hf" not in scripts["remote-code"] and "224" not in "".join(scripts.values())

    env = offline_hub_cache(REPO_ID, out) | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    bootstraps = {"package": "", "remote-code": "import sys; sys.modules['declip_hf'] = None; "}
    processes = {}
    for kind, code in scripts.items():
        (tmp_path / f"{kind}.py").write_text(code)
        command = [
            sys.executable,
            "-c",
            bootstraps[kind] + f"exec(compile(open('{kind}.py').read(), '{kind}.py', 'exec'))",
        ]
        processes[kind] = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    outputs, errors = {}, {}
    for kind, process in processes.items():
        outputs[kind], errors[kind] = process.communicate(timeout=300)
        assert process.returncode == 0, f"{kind} snippets failed:\n{errors[kind][-3000:]}"
    # Tiny model: image 32, patch 4, projection 24, hidden 32; processor at 32 px, training resolution 64 px.
    printed = outputs["package"].splitlines()
    assert printed[:5] == [
        "torch.Size([1, 24, 16, 16])",  # dense features at the 64 px training resolution (prepare_dense_inputs)
        "torch.Size([1, 24, 16, 16])",  # at twice CLIP's 32 px
        "[torch.Size([1, 256, 32]), torch.Size([1, 256, 32])]",  # csa: q and k context features
        "torch.Size([1, 24])",  # CLIP's image embedding at 32 px
        "torch.Size([2, 24])",  # two boxes
    ], outputs["package"]
    assert "DeCLIPSegmenter.from_pretrained" in scripts["package"] and "torch.Size([480, 640])" in outputs["package"]
    # Without the package: dense features at the processor's 32 px, and the pipeline's last hidden state.
    assert outputs["remote-code"].splitlines()[-2:] == ["torch.Size([1, 24, 8, 8])", "torch.Size([1, 65, 32])"]


def test_remote_code_snippets_cannot_import_the_package(released, tmp_path):
    out, _, _ = released
    marker = "<!-- declip-snippet: remote-code -->\n```python\n"
    card = (out / "README.md").read_text().replace(marker, marker + "import declip_hf\n", 1)
    scripts = {"remote-code": "\n\n".join(release.extract_snippets(card)["remote-code"])}
    env = release.snippet_environment(out, REPO_ID, tmp_path)
    result = release.run_snippet_scripts(scripts, env, tmp_path)["remote-code"]
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stdout and "declip_hf" in result.stdout


def test_validation_reports_failing_subprocesses(released, monkeypatch):
    out, _, _ = released

    def failing_scripts(scripts, env, workdir):
        return {kind: subprocess.CompletedProcess([], 1, f"Traceback\nNameError in {kind}") for kind in scripts}

    monkeypatch.setattr(release, "run_snippet_scripts", failing_scripts)
    report = release.validate_release(out, REPO_ID, expect_results=True)
    assert not report.passed
    assert {check.name: check.passed for check in report.checks} == {
        "card metadata parses": True,
        "folder layout (safetensors, auto_map code, image processor, no pickles)": True,
        "weights load with declip_hf": True,
        "weights load without declip_hf (trust_remote_code)": False,
        f"card snippets (package) run offline as {REPO_ID}": False,
        f"card snippets (remote-code) run offline as {REPO_ID}": False,
    }
    assert "NameError in package" in str(report)


def test_layout_check_flags_pickles_and_missing_code(released, tmp_path):
    out, _, _ = released
    folder = tmp_path / "folder"
    shutil.copytree(out, folder)
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    (folder / "region_pooling.py").unlink()
    (folder / "modeling_declip.py").unlink()
    check = release.check_layout(folder)
    assert not check.passed
    assert "pickle file pytorch_model.bin" in check.detail and "modeling_declip.py missing" in check.detail


def test_unmarked_python_block_is_refused():
    card = "<!-- declip-snippet: package -->\n```python\nprint(1)\n```\n\n```python\nprint(2)\n```\n"
    with pytest.raises(ValueError, match="1 of the card's 2 python blocks"):
        release.extract_snippets(card)
    with pytest.raises(ValueError, match="Unknown snippet kind 'shell'"):
        release.extract_snippets("<!-- declip-snippet: shell -->\n```python\nprint(1)\n```\n")


def test_push_refused_without_token(tiny_run, hub_calls, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(release, "get_token", lambda: None)
    code = release.main(
        [str(tiny_run), "--repo-id", REPO_ID, "--out", str(tmp_path / "out"), "--push", "--license", "mit"]
    )
    assert code == 2 and hub_calls == []
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_push_refused_when_validation_fails(tiny_run, hub_calls, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("release"))
    config = json.loads((run / "model" / "config.json").read_text())
    del config["auto_map"]
    (run / "model" / "config.json").write_text(json.dumps(config))
    code = release.main([str(run), "--repo-id", REPO_ID, "--push", "--license", "mit"])
    captured = capsys.readouterr()
    assert code == 1 and hub_calls == []
    assert "auto_map lacks AutoModel" in captured.out and "refusing to push, nothing was uploaded" in captured.err


def test_push_failure_is_reported_without_claiming_an_upload(monkeypatch, tmp_path):
    def failing_upload(self, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", failing_upload)
    with pytest.raises(SystemExit, match="no file of this release was committed"):
        release.push_release(tmp_path, REPO_ID, private=False, message="m", token="hf_x")


def test_release_refuses_unknown_license(tiny_run, tmp_path, capsys):
    code = release.main([str(tiny_run), "--repo-id", REPO_ID, "--out", str(tmp_path / "out")])
    assert code == 2 and "pass --license" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_release_reports_bad_inputs_in_one_line(tiny_run, tmp_path, capsys):
    """A missing run, a missing or malformed results file: one `error:` line naming the problem, exit status 2."""
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    cases = {
        str(tmp_path / "nope.json"): "results file .*nope.json does not exist",
        str(tmp_path / "list.json"): "holds a JSON list",
        str(tmp_path / "broken.json"): "is not JSON",
    }
    for results, message in cases.items():
        code = release.main([str(tiny_run), "--repo-id", REPO_ID, "--license", "mit", "--results", results])
        error = capsys.readouterr().err
        assert code == 2 and error.count("\n") == 1 and error.startswith("error: "), error
        assert re.search(message, error), error
    assert release.main([str(tmp_path / "no_run"), "--repo-id", REPO_ID]) == 2
    assert "training_args.json is missing" in capsys.readouterr().err
    assert not (tiny_run / "release").exists()  # nothing was assembled


def test_release_flags_show_defaults_and_refuse_abbreviations(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        release.parse_args(["--help"])
    assert exit_info.value.code == 0 and "(default: False)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        release.parse_args([str(tiny_run), "--repo", REPO_ID])  # an abbreviation of --repo-id
    assert exit_info.value.code == 2 and "--repo-id" in capsys.readouterr().err


def test_known_base_model_must_match_the_architecture(tiny_run, vit_b16_run, capsys):
    with pytest.raises(ValueError, match=r"openai/clip-vit-base-patch16 is a ViT-B-16 CLIP.*layers: checkpoint 2, "):
        build_model_card(TrainingRun.from_dir(tiny_run), REPO_ID, "mit", base_model="openai/clip-vit-base-patch16")
    code = release.main([str(tiny_run), "--repo-id", REPO_ID, "--base-model", "openai/clip-vit-large-patch14"])
    error = capsys.readouterr().err
    assert code == 2 and "is a ViT-L-14 CLIP" in error and "--base-model" in error
    # The matching architecture, and a base model the table does not know, are accepted.
    build_model_card(TrainingRun.from_dir(vit_b16_run), REPO_ID, "mit", base_model="openai/clip-vit-base-patch16")
    build_model_card(TrainingRun.from_dir(tiny_run), REPO_ID, "mit", base_model="declip-test/tiny-clip")


def test_card_shows_no_local_paths(tiny_run, tmp_path):
    """--base-model and --dataset replace the run's local student and dataset everywhere in the card; any other
    absolute path (script, output folder) keeps only its last component."""
    run = TrainingRun.from_dir(tiny_run)
    dataset_path, output_dir = str(tmp_path / "my_private_images"), str(tmp_path / "runs" / "declip_tiny")
    run.args = {**run.args, "dataset": dataset_path, "output_dir": output_dir}
    run.command = shlex.join([
        "accelerate", "launch", f"{tmp_path}/checkout/training/distill.py", "--config", f"{tmp_path}/my runs/a.yaml",
        "--student", run.args["student"], "--dataset", dataset_path, f"--output_dir={output_dir}",
    ])
    card = build_model_card(
        run, REPO_ID, "mit", base_model="declip-test/tiny-clip", datasets=["declip-test/street-scenes"]
    )
    text = str(card)
    assert str(tmp_path) not in text and "/tmp" not in text
    assert (
        "accelerate launch .../distill.py --config .../a.yaml --student declip-test/tiny-clip "
        "--dataset declip-test/street-scenes --output_dir=.../declip_tiny"
    ) in text
    assert _markdown_table_row("student", "declip-test/tiny-clip") in text
    assert _markdown_table_row("dataset", "declip-test/street-scenes") in text
    assert _markdown_table_row("output_dir", ".../declip_tiny") in text
    assert "[declip-test/street-scenes](https://huggingface.co/datasets/declip-test/street-scenes)" in text
    assert "is natural images" not in text  # the card claims nothing about data it did not see


def test_card_mentions_the_region_table_only_when_there_is_one(tiny_run):
    run = TrainingRun.from_dir(tiny_run)
    without = str(build_model_card(run, REPO_ID, "mit"))
    segmentation_only = {key: value for key, value in RESULTS.items() if key != "region_classification"}
    with_segmentation = str(build_model_card(run, REPO_ID, "mit", results=segmentation_only))
    with_regions = str(build_model_card(run, REPO_ID, "mit", results=RESULTS))
    assert "table above" not in without and "table above" not in with_segmentation
    assert "region\ntable above quotes" in with_regions


def test_project_url_is_the_one_in_pyproject():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert PROJECT_URL in pyproject["project"]["urls"].values()
    # Every declip_hf package is listed (the list is explicit because the template folder is mapped into it).
    init_files = (REPO_ROOT / "declip_hf").rglob("__init__.py")
    packages = {".".join(path.parent.relative_to(REPO_ROOT).parts) for path in init_files}
    assert packages <= set(pyproject["tool"]["setuptools"]["packages"])


def test_installed_package_builds_the_card_from_its_own_template(tiny_run, tmp_path):
    """A non-editable install (a built wheel) carries the card template as package data, read through
    importlib.resources, and builds a card away from any source checkout."""
    source, wheel_dir, site = tmp_path / "source", tmp_path / "wheel", tmp_path / "site"
    # Build from a copy: setuptools leaves build/ and *.egg-info beside the sources, and a stale build/ would be
    # packaged again by a later build.
    no_caches = shutil.ignore_patterns("__pycache__")
    for folder in ("declip_hf", "model_cards"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=no_caches)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheel_dir)]
    subprocess.run(build, cwd=tmp_path, check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("declip_hf-*.whl")
    assert "declip_hf/hub/model_cards/declip_vision_model_card.md" in zipfile.ZipFile(wheel).namelist()
    install = [*pip, "install", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(install, cwd=tmp_path, check=True, capture_output=True)
    script = (
        "import declip_hf, sys\n"
        "from declip_hf.hub.model_card import PACKAGED_TEMPLATE, SOURCE_TEMPLATE, TrainingRun, build_model_card\n"
        f"assert declip_hf.__file__.startswith({str(site)!r}), declip_hf.__file__\n"
        "assert PACKAGED_TEMPLATE.is_file() and not SOURCE_TEMPLATE.exists()\n"
        f"card = build_model_card(TrainingRun.from_dir({str(tiny_run)!r}), 'org/name', 'mit')\n"
        "print(card.data.pipeline_tag, 'prepare_dense_inputs' in str(card))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["image-feature-extraction", "True"]


def test_layout_check_refuses_a_processor_at_another_size(released, tmp_path):
    """A processor at the training size (as runs before this check saved it) would break the forward, the pipeline
    and the Hub widget: the release refuses it and says what to set."""
    out, _, _ = released
    folder = tmp_path / "folder"
    shutil.copytree(out, folder)
    path = folder / "preprocessor_config.json"
    processor = json.loads(path.read_text())
    del processor["declip_training_size"]
    path.write_text(json.dumps({**processor, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}))
    check = release.check_layout(folder)
    assert not check.passed
    assert "gives 64x64 px inputs but config.image_size is 32" in check.detail
    assert "records no declip_training_size" in check.detail
