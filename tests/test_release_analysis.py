"""`declip-release --analysis-images`: the card shows the proxy-token figure, which is in the folder."""

import io
import shutil
from contextlib import redirect_stdout

import pytest
from PIL import Image, ImageDraw

from declip_hf import DeCLIPVisionModel
from declip_hf.analysis import model_proxy_scores
from declip_hf.hub import release
from declip_hf.models.loading_utils import image_normalisation
from declip_hf.models.preprocessing import prepare_dense_inputs
from tests.test_release import build_tiny_run

REPO_ID = "declip-test/tiny-analysed"


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card_images")
    for index in range(2):
        image = Image.new("RGB", (64, 48 + 8 * index), (120, 170, 230))
        ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill=(230, 80, 30))
        image.save(folder / f"sample{index}.jpg")
    return folder


@pytest.fixture(scope="module")
def analysed_release(tmp_path_factory, tiny_clip_dir, sample_images):
    run = build_tiny_run(tmp_path_factory.mktemp("run"), tiny_clip_dir)
    out = tmp_path_factory.mktemp("release")
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = release.main([str(run), "--repo-id", REPO_ID, "--out", str(out), "--overwrite", "--license", "mit",
                             "--analysis-images", str(sample_images)])
    assert code == 0, printed.getvalue()
    return run, out, printed.getvalue()


def test_card_shows_the_figure_and_the_scores(analysed_release, tiny_clip_dir, sample_images):
    run, out, printed = analysed_release
    assert "[FAILED]" not in printed
    with Image.open(out / "proxy_scores.png") as figure:
        assert figure.format == "PNG" and figure.width > 400
    card = (out / "README.md").read_text()
    assert "![Proxy-token score and row similarity per layer](proxy_scores.png)" in card
    assert "on\n2 sample image(s) at 32 px" in card
    # The table's numbers are the API's on the same letterboxed images, for the run's model and its student (both
    # read in the run's mode).
    mode = DeCLIPVisionModel.from_pretrained(run / "model").config.decoupled_attention
    assert f"read in mode `{mode}`" in card
    images = [Image.open(path) for path in sorted(sample_images.iterdir())]
    for checkpoint, label in ((run / "model", "tiny-analysed"), (tiny_clip_dir, tiny_clip_dir.name)):
        model = DeCLIPVisionModel.from_pretrained(checkpoint, decoupled_attention=mode).eval()
        mean, std = image_normalisation(str(checkpoint))
        scores = [model_proxy_scores(model, prepare_dense_inputs(image, 32, mean, std)).proxy_score for image in images]
        deepest, decoupled = (sum(score[index].item() for score in scores) / 2 for index in (-2, -1))
        assert f"| {label} ({mode}) | {deepest:.3f} | {decoupled:.3f} |" in card


def test_layout_check_refuses_a_card_figure_missing_from_the_folder(analysed_release, tmp_path):
    _, out, _ = analysed_release
    assert release.check_layout(out).passed
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "proxy_scores.png").unlink()
    check = release.check_layout(copy)
    assert not check.passed and "the card shows proxy_scores.png, which is not in the folder" in check.detail


def test_analysis_images_are_checked_before_the_release_is_assembled(tmp_path, tiny_clip_dir, capsys):
    run = build_tiny_run(tmp_path / "run", tiny_clip_dir)
    code = release.main([str(run), "--repo-id", REPO_ID, "--out", str(tmp_path / "out"), "--license", "mit",
                         "--analysis-images", str(tmp_path / "missing.jpg")])
    assert code == 2
    assert "missing.jpg is neither an image file nor a folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "README.md").exists()
