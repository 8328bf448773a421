"""Assemble and validate a Hugging Face Space that serves `declip_hf.segmentation.demo` for a released DeCLIP model
(DeCLIP, CVPR 2025, arXiv 2505.04410); `declip-release RUN_DIR --repo-id ORG/NAME --space DIR` calls it.

The Space folder holds `app.py` (builds the demo's Gradio page for the released model), `requirements.txt` (the
package's own requirements; Gradio itself comes from the card's `sdk_version`), a copy of the `declip_hf` package
(the app runs exactly the code that was validated, whether or not the package is on PyPI) and a README.md whose
metadata the Hub reads (sdk, sdk_version, app_file, models). It is validated offline: the metadata, the
requirements, and the app imported from the Space folder alone against an offline Hub cache holding the release
under its repo id, building its page and segmenting one image.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData
from packaging.requirements import InvalidRequirement, Requirement

from .validation import PACKAGE_ROOT, Check, ValidationReport, build_offline_hub_cache, prepare_out_dir

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # declip_hf/, copied whole into the Space
APP_FILE = "app.py"
DISTRIBUTION = "declip-hf"
SPACE_CHECK_TIMEOUT_S = 600
SPACE_APP_VERIFIED = "declip-space: app built and segmented offline"

SPACE_APP = '''"""DeCLIP demo for {repo_id}: segment an image into your words, click a point to see its context
correlation and final-layer attention. Assembled by `declip-release --space`."""

import torch

from declip_hf.segmentation.demo import DemoSettings, build_demo, resolve_map_size
from declip_hf.segmentation.segmenter import DeCLIPSegmenter

MODEL = {repo_id!r}

segmenter = DeCLIPSegmenter.from_pretrained(MODEL).to("cuda" if torch.cuda.is_available() else "cpu")
settings = DemoSettings(map_size=resolve_map_size(0, MODEL, segmenter.vision_model.patch_size))
demo = build_demo(segmenter, settings, title=f"DeCLIP: {{MODEL}}")

if __name__ == "__main__":
    demo.launch()
'''

SPACE_BODY = """
# DeCLIP: {repo_id}

Interactive demo of [{repo_id}](https://huggingface.co/{repo_id}), a DeCLIP model (CVPR 2025, arXiv 2505.04410):
upload an image and type class names to get a segmentation overlay; click a point to see its context correlation
map and its final-layer attention. Runs `declip_hf.segmentation.demo` from the copy of the package in this Space.
"""

# Run from the Space folder alone (`python -c`, so the folder is first on sys.path and its declip_hf copy wins).
_APP_CHECK = f"""
import pathlib
import gradio
import declip_hf
assert pathlib.Path(declip_hf.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()), declip_hf.__file__
import app
from declip_hf.segmentation.demo import point_maps, segment_image
from PIL import Image
assert isinstance(app.demo, gradio.Blocks), type(app.demo)
image = Image.new("RGB", (48, 40), (90, 160, 60))
overlay, areas = segment_image(app.segmenter, image, "grass, sky", app.settings)
assert overlay.width > image.width and "grass" in areas, (overlay.size, areas)
maps = point_maps(app.segmenter, image, 10, 10, app.settings)
assert maps.correlation.size == maps.attention.size == image.size
print({SPACE_APP_VERIFIED!r}, flush=True)
"""


def gradio_version() -> str:
    """The installed Gradio's version: the Space runs the version its page was built and validated with."""
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError('--space needs Gradio to build and validate the app: pip install "declip-hf[demo]".') from None


def package_requirements() -> list[str]:
    """The package's own requirements (no extras): from the source checkout's pyproject.toml beside the copied code,
    else from the installed distribution's metadata."""
    pyproject = PACKAGE_ROOT / "pyproject.toml"
    if pyproject.is_file() and sys.version_info >= (3, 11):
        import tomllib

        return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    requirements = importlib.metadata.requires(DISTRIBUTION) or []
    return [line for line in requirements if "extra ==" not in line]


def copy_package(space_dir: Path) -> None:
    """The package's Python files (subpackages included, caches left out) into `space_dir/declip_hf`."""
    for source in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in source.parts:
            continue
        target = space_dir / "declip_hf" / source.relative_to(PACKAGE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def build_space_card(repo_id: str, license: str | None) -> SpaceCard:
    data = SpaceCardData(
        title=f"DeCLIP {repo_id.split('/')[-1]}"[:60], sdk="gradio", sdk_version=gradio_version(), app_file=APP_FILE,
        license=license, models=[repo_id], tags=["declip", "open-vocabulary-segmentation"],
        short_description="Open-vocabulary segmentation and attention maps with DeCLIP",
        emoji="🔎", colorFrom="blue", colorTo="green", pinned=False,
    )
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n{SPACE_BODY.format(repo_id=repo_id)}")


def assemble_space(space_dir: Path, repo_id: str, license: str | None) -> None:
    """Write app.py, requirements.txt, README.md and the package copy into the (empty) `space_dir`."""
    (space_dir / APP_FILE).write_text(SPACE_APP.format(repo_id=repo_id))
    (space_dir / "requirements.txt").write_text("\n".join(package_requirements()) + "\n")
    build_space_card(repo_id, license).save(space_dir / "README.md")
    copy_package(space_dir)


# --------------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------------


def check_space_metadata(space_dir: Path, repo_id: str) -> Check:
    try:
        metadata = SpaceCard.load(space_dir / "README.md").data.to_dict()
    except Exception as error:  # noqa: BLE001 - any parse error fails the check
        return Check("Space metadata parses", False, f"{type(error).__name__}: {error}")
    expected = {"sdk": "gradio", "sdk_version": gradio_version(), "app_file": APP_FILE, "models": [repo_id]}
    problems = [
        f"{key} is {metadata.get(key)!r}, not {value!r}"
        for key, value in expected.items()
        if metadata.get(key) != value
    ]
    app_file = str(metadata.get("app_file"))
    problems += [] if (space_dir / app_file).is_file() else [f"{app_file} missing"]
    return Check("Space metadata parses (sdk gradio, sdk_version, app_file, models)", not problems, "; ".join(problems))


def check_space_requirements(space_dir: Path) -> Check:
    """Every line a valid requirement, and no Gradio line: the Hub installs the card's sdk_version, and a second
    Gradio requirement could replace it with another version."""
    problems = []
    lines = [line.strip() for line in (space_dir / "requirements.txt").read_text().splitlines()]
    for line in filter(None, lines):
        try:
            name = Requirement(line).name.lower()
        except InvalidRequirement as error:
            problems.append(f"{line!r}: {error}")
            continue
        if name in ("gradio", "gradio-client", "gradio_client"):
            problems.append(f"{line!r}: Gradio comes from the card's sdk_version; do not list it")
    return Check("Space requirements.txt", not problems, "; ".join(problems))


def space_environment(model_folder: Path, repo_id: str, workdir: Path) -> dict[str, str]:
    """An offline Hub cache holding the release as `repo_id`; no PYTHONPATH, so the Space's own package copy runs."""
    env = build_offline_hub_cache(workdir / "hub_cache", repo_id, model_folder)
    env.pop("PYTHONPATH", None)
    return env | {"HF_MODULES_CACHE": str(workdir / "modules"), "GRADIO_ANALYTICS_ENABLED": "False"}


def check_space_app(space_dir: Path, model_folder: Path, repo_id: str) -> Check:
    name = f"Space app builds and segments offline against {repo_id}"
    with tempfile.TemporaryDirectory(prefix="declip_space_") as workdir:
        try:
            env = space_environment(model_folder, repo_id, Path(workdir))
            result = subprocess.run(
                [sys.executable, "-c", _APP_CHECK], cwd=space_dir, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, timeout=SPACE_CHECK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return Check(name, False, f"killed after {SPACE_CHECK_TIMEOUT_S} s")
    if SPACE_APP_VERIFIED not in result.stdout:
        return Check(name, False, "\n".join(result.stdout.strip().splitlines()[-15:]))
    return Check(name, True, "page built, one image segmented, point maps drawn")


def validate_space(space_dir: Path, model_folder: Path, repo_id: str) -> ValidationReport:
    """Static checks first; the app runs only when they pass."""
    checks = [check_space_metadata(space_dir, repo_id), check_space_requirements(space_dir)]
    if all(check.passed for check in checks):
        checks.append(check_space_app(space_dir, model_folder, repo_id))
    return ValidationReport(checks)


def prepare_space_dir(space_dir: Path, run_dir: Path, model_folder: Path, replace: bool) -> Path:
    """An empty folder for the Space, apart from the run's files and the model release."""
    space_dir = Path(space_dir).resolve()
    model_folder = Path(model_folder).resolve()
    if space_dir.is_relative_to(model_folder) or model_folder.is_relative_to(space_dir):
        raise ValueError(f"--space {space_dir} overlaps the model release folder {model_folder}; choose another.")
    return prepare_out_dir(space_dir, run_dir, replace=replace)


def upload_hint(space_dir: Path, repo_id: str) -> str:
    return (f"To publish it: hf repos create {repo_id}-demo --repo-type space --space-sdk gradio && "
            f"hf upload {repo_id}-demo {os.fspath(space_dir)} . --repo-type space")
