"""`declip-analyze` end to end on tiny models: valid PNGs, a JSON whose scores are the API's."""

import json
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from declip_hf import DeCLIPVisionModel
from declip_hf.analysis import model_proxy_scores
from declip_hf.analyze import main
from declip_hf.models.loading_utils import image_normalisation
from declip_hf.models.preprocessing import prepare_dense_inputs


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analysis_images")
    for index in range(3):
        image = Image.new("RGB", (72 + 8 * index, 56), (90, 150, 220))
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 40, 96, 56], fill=(60, 140, 60))
        draw.ellipse([10 + 8 * index, 8, 40 + 8 * index, 38], fill=(220, 60, 40))
        image.save(folder / f"scene{index}.png")
    (folder / "notes.txt").write_text("not an image: skipped by the folder scan")
    return folder


@pytest.fixture(scope="module")
def analysed(image_folder, tiny_clip_dir, tiny_dinov2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "out"
    report = main([
        str(image_folder), "--model", str(tiny_clip_dir), "--compare", str(tiny_clip_dir),
        "--compare-decoupled-attention", "csa", "--vfm", str(tiny_dinov2_dir), "--out", str(out),
        "--figure-images", "1", "--top-k", "3", "--points", "0.5,0.5;0.1,0.9",
    ])
    return out, report


def test_writes_valid_pngs_and_json(analysed, tiny_clip_dir, tiny_dinov2_dir):
    out, report = analysed
    names = {path.name for path in out.iterdir()}
    expected_pngs = {"proxy_scores.png", "attention_tiny_clip0_qq_scene0.png",
                     "attention_tiny_clip0_csa_scene0.png", "correlation_scene0.png"}
    assert {name for name in names if name.endswith(".png")} == {name.replace("tiny_clip0", tiny_clip_dir.name)
                                                                  for name in expected_pngs}
    for name in names - {"scores.json"}:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    saved = json.loads((out / "scores.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["images"] == ["scene0.png", "scene1.png", "scene2.png"] and saved["top_k"] == 3
    assert "proxy_score" in saved["definition"] and saved["vfm"] == str(tiny_dinov2_dir)
    assert sorted(saved["models"]) == [f"{tiny_clip_dir.name} (csa)", f"{tiny_clip_dir.name} (qq)"]


def test_json_scores_are_the_apis_on_the_letterboxed_images(analysed, image_folder, tiny_clip_dir):
    _, report = analysed
    entry = report["models"][f"{tiny_clip_dir.name} (csa)"]
    assert entry["layers"] == ["1", "2", "2 (csa)"] and entry["decoupled_attention"] == "csa"
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="csa").eval()
    mean, std = image_normalisation(str(tiny_clip_dir))
    for index in range(3):
        image = Image.open(image_folder / f"scene{index}.png")
        scores = model_proxy_scores(model, prepare_dense_inputs(image, 32, mean, std), top_k=3)
        assert entry["proxy_score"]["per_image"][index] == pytest.approx(scores.proxy_score.tolist(), abs=1e-6)
        assert entry["row_similarity"]["per_image"][index] == pytest.approx(scores.row_similarity.tolist(), abs=1e-6)
    per_image = torch.tensor(entry["proxy_score"]["per_image"])
    assert entry["proxy_score"]["mean"] == pytest.approx(per_image.mean(0).tolist())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--points", "0.5;2,1"], "--points"),
        (["--size", "30"], "multiple"),
        (["--vfm", "MODEL"], "dinov2"),
    ],
)
def test_user_errors_end_in_one_line(extra, message, image_folder, tiny_clip_dir, tmp_path, capsys):
    extra = [str(tiny_clip_dir) if item == "MODEL" else item for item in extra]
    with pytest.raises(SystemExit) as exit_info:
        main([str(image_folder), "--model", str(tiny_clip_dir), "--out", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and message in error and "\n" not in error


def test_missing_images_and_matplotlib_are_named(tmp_path, tiny_clip_dir, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere.jpg"), "--model", str(tiny_clip_dir), "--out", str(tmp_path / "out")])
    assert "neither an image file nor a folder" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a.png"), "--model", str(tiny_clip_dir), "--out", str(tmp_path / "out")])
    assert 'pip install "declip-hf[viz]"' in capsys.readouterr().err
