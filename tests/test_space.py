"""`declip-release ... --space DIR`: the Hugging Face Space folder for a release, validated offline."""

import importlib.metadata
import io
import shutil
import tomllib
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from huggingface_hub import SpaceCard

from declip_hf.hub import release, space
from tests.conftest import REPO_ROOT
from tests.test_release import build_tiny_run

REPO_ID = "declip-hf/declip-tiny"
gradio = pytest.importorskip("gradio", reason='Gradio is not installed: pip install "declip-hf[demo]"')


@pytest.fixture(scope="module")
def released_space(tmp_path_factory, tiny_clip_dir):
    """`release RUN --space DIR` end to end on the tiny run; returns (model folder, Space folder, stdout)."""
    run = build_tiny_run(tmp_path_factory.mktemp("space_run"), tiny_clip_dir)
    out, space_dir = tmp_path_factory.mktemp("release"), tmp_path_factory.mktemp("space")
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = release.main(
            [str(run), "--repo-id", REPO_ID, "--license", "mit", "--out", str(out), "--space", str(space_dir)]
        )
    assert code == 0, printed.getvalue()
    return out, space_dir, printed.getvalue()


def test_release_assembles_a_space_that_runs_offline(released_space):
    _, space_dir, printed = released_space
    assert f"[ok] Space app builds and segments offline against {REPO_ID}" in printed
    assert f"hf upload {REPO_ID}-demo" in printed
    metadata = SpaceCard.load(space_dir / "README.md").data.to_dict()
    assert metadata["sdk"] == "gradio" and metadata["sdk_version"] == gradio.__version__
    assert metadata["app_file"] == "app.py" and metadata["models"] == [REPO_ID] and metadata["license"] == "mit"
    assert f"MODEL = {REPO_ID!r}" in (space_dir / "app.py").read_text()
    # The package's own requirements, and no Gradio line (the Hub installs sdk_version).
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert (space_dir / "requirements.txt").read_text().split() == pyproject["project"]["dependencies"]
    # Every module of the package is copied, no bytecode caches.
    package = REPO_ROOT / "declip_hf"
    expected = {str(path.relative_to(package)) for path in package.rglob("*.py") if "__pycache__" not in path.parts}
    copied = {str(path.relative_to(space_dir / "declip_hf")) for path in (space_dir / "declip_hf").rglob("*")
              if path.is_file()}  # files only: a subpackage's folder is not a module
    assert copied == expected
    assert {"segmentation/demo.py", "models/modeling_declip.py", "vfm/registry.py"} <= copied


def _copy(space_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(space_dir, tmp_path / "space"))


def test_space_checks_catch_wrong_metadata_and_requirements(released_space, tmp_path):
    _, space_dir, _ = released_space
    broken = _copy(space_dir, tmp_path)
    card = (broken / "README.md").read_text()
    (broken / "README.md").write_text(card.replace(f"sdk_version: {gradio.__version__}", "sdk_version: 4.0.0")
                                      .replace(f"- {REPO_ID}", "- someone/else"))
    check = space.check_space_metadata(broken, REPO_ID)
    assert not check.passed and "sdk_version is '4.0.0'" in check.detail
    assert "models is ['someone/else']" in check.detail
    (broken / "app.py").unlink()
    assert "app.py missing" in space.check_space_metadata(broken, REPO_ID).detail
    (broken / "requirements.txt").write_text("torch>=2.5\ngradio==5.0\nnot a requirement ===\n")
    check = space.check_space_requirements(broken)
    assert not check.passed and "'gradio==5.0'" in check.detail and "'not a requirement ===':" in check.detail
    assert space.check_space_requirements(space_dir).passed


def test_gradio_missing_names_the_extra(monkeypatch):
    def no_gradio(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(space.importlib.metadata, "version", no_gradio)
    with pytest.raises(ValueError, match=r'pip install "declip-hf\[demo\]"'):
        space.gradio_version()


def test_space_folder_is_checked_before_any_work(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    run = build_tiny_run(tmp_path / "run", tiny_clip_dir)
    out = tmp_path / "release"
    base = [str(run), "--repo-id", REPO_ID, "--license", "mit", "--out", str(out)]
    assert release.main([*base, "--space", str(out / "space")]) == 2
    assert "overlaps the model release folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert release.main([*base, "--space", str(tmp_path / "busy")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    def no_gradio():
        raise ValueError('--space needs Gradio to build and validate the app: pip install "declip-hf[demo]".')

    monkeypatch.setattr(space, "gradio_version", no_gradio)
    assert release.main([*base, "--space", str(tmp_path / "space")]) == 2
    assert 'pip install "declip-hf[demo]"' in capsys.readouterr().err
    assert not any(out.iterdir()) and not (tmp_path / "space").exists()  # nothing assembled
