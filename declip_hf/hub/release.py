"""Assemble, validate and push a DeCLIP release (DeCLIP, CVPR 2025, arXiv 2505.04410) to the Hugging Face Hub.

    declip-release RUN_DIR --repo-id org/name [--results results.json] [--out DIR] [--push] [--private]
        [--analysis-images IMAGES...]

The folder it assembles is what gets uploaded: safetensors weights, config with `auto_map`, the model code for
`trust_remote_code`, the image processor config, `text_encoder/` when the run has one, and a README.md card. It is
validated first (card metadata, loading with and without the package, the card's snippets run offline against
the folder under the repo id) and `--push` refuses unless every check passed. With `--analysis-images`, the card
also shows the proxy-token scores of the released model and of the CLIP it started from on those images (a figure
in the folder, drawn with matplotlib: `pip install "declip-hf[viz]"`).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from ..analyze import release_analysis
from ..models.loading_utils import TEXT_ENCODER_SUBFOLDER
from ..models.modeling_declip_eva import declip_vision_class
from ..models.preprocessing import TRAINING_SIZE_FIELD
from .model_card import (
    PIPELINE_TAG,
    PROJECT_URL,
    REQUIRED_TAGS,
    TrainingRun,
    build_model_card,
    default_license,
    hub_id_or_none,
    load_results,
)
from .validation import PACKAGE_ROOT, Check, ValidationReport, build_offline_hub_cache, prepare_out_dir

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
SUBPROCESS_TIMEOUT_S = 900

# A card snippet is a ```python block right after a `<!-- declip-snippet: KIND -->` marker (invisible on the Hub).
# The blocks of one kind run in document order as one script, like notebook cells; the kind says what runs first.
SNIPPET_BLOCK = re.compile(r"<!-- declip-snippet: ([\w-]+) -->\s*```python\n(.*?)^```", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\s*$", re.M)
# Images the card shows from the folder itself: `![alt](file)` with a relative path.
CARD_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\((?![a-z]+://)([^)\s]+)\)")
# Snippets shown "without the package" must run where declip_hf cannot be imported at all.
_WITHOUT_PACKAGE = "import sys\nsys.modules['declip_hf'] = None  # an environment without declip-hf\n\n"
SNIPPET_PREAMBLES = {"package": "", "remote-code": _WITHOUT_PACKAGE}

# Loads the folder through `auto_map` alone, checks nothing was left unloaded, saves outputs on the parent's inputs.
# It opens the remote-code snippet script, so that one interpreter start (seconds of imports) serves both checks.
REMOTE_LOAD_VERIFIED = "declip-release: remote-code weights verified"
_REMOTE_CODE_CHECK = """import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

_model, _info = AutoModel.from_pretrained({folder!r}, trust_remote_code=True, output_loading_info=True)
_problems = {{name: value for name, value in _info.items() if value}}
assert not _problems, f"loading reported {{_problems}}"
assert not type(_model).__module__.startswith("declip_hf"), f"loaded {{type(_model).__module__}}, not the folder's code"
_pixel_values = load_file({inputs!r})["pixel_values"]
with torch.no_grad():
    save_file({{
        "image_embeds": _model.eval().get_image_features(_pixel_values, return_dict=True).pooler_output.contiguous(),
        "dense_embeds": _model.get_dense_features(_pixel_values).dense_embeds.contiguous(),
    }}, {outputs!r})
print({verified!r}, flush=True)
del _model, _info, _problems, _pixel_values

"""


# --------------------------------------------------------------------------------------------------------------------
# Assembling
# --------------------------------------------------------------------------------------------------------------------


def assemble_release(model_dir: Path, out: Path, card: ModelCard) -> list[str]:
    """Copy the saved model (minus pickles) into `out` and write the card; returns the pickle files left out."""
    left_out = []
    for source in sorted(model_dir.rglob("*")):
        if not source.is_file():
            continue
        relative = source.relative_to(model_dir)
        if source.suffix in PICKLE_SUFFIXES:
            left_out.append(str(relative))
            continue
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, out / relative)
    card.save(out / "README.md")
    return left_out


def extract_snippets(card_text: str) -> dict[str, list[str]]:
    """The card's python blocks by kind, in document order. Every python block must be marked with a kind that
    `SNIPPET_PREAMBLES` knows, so that none goes unchecked."""
    snippets: dict[str, list[str]] = {}
    for kind, code in SNIPPET_BLOCK.findall(card_text):
        if kind not in SNIPPET_PREAMBLES:
            raise ValueError(f"Unknown snippet kind {kind!r}; valid kinds are {', '.join(SNIPPET_PREAMBLES)}.")
        snippets.setdefault(kind, []).append(code)
    marked, total = sum(map(len, snippets.values())), len(PYTHON_BLOCK.findall(card_text))
    if marked != total:
        raise ValueError(f"{total - marked} of the card's {total} python blocks have no declip-snippet marker.")
    return snippets


# --------------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------------


def check_card_metadata(folder: Path, expect_results: bool) -> Check:
    try:
        card = ModelCard.load(folder / "README.md")
        metadata = card.data.to_dict()
        # Parsing the metadata back must give the same metadata (model-index included).
        round_trip = ModelCardData(**metadata).to_dict()
    except Exception as error:  # noqa: BLE001 - any parse error fails the check
        return Check("card metadata parses", False, f"{type(error).__name__}: {error}")
    problems = [f"round trip changed {sorted(set(metadata) ^ set(round_trip))}"] if round_trip != metadata else []
    expected = {"library_name": "transformers", "pipeline_tag": PIPELINE_TAG}
    problems += [
        f"{key} is {metadata.get(key)!r}, not {value!r}"
        for key, value in expected.items()
        if metadata.get(key) != value
    ]
    problems += [f"tag {tag!r} missing" for tag in REQUIRED_TAGS if tag not in (metadata.get("tags") or [])]
    problems += ["license missing"] if not metadata.get("license") else []
    problems += ["results given but no model-index"] if expect_results and not card.data.eval_results else []
    return Check("card metadata parses", not problems, "; ".join(problems))


def image_processor_problems(folder: Path, config: dict) -> list[str]:
    """The image processor must give the model's own input size: the ordinary forward, transformers'
    image-feature-extraction pipeline and the Hub widget (the card's pipeline tag) feed it its output unchanged, and
    refuse any other size. The training resolution is recorded beside it for the card's dense snippets."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return ["preprocessor_config.json missing"]
    processor = json.loads(path.read_text())
    image_size = config.get("image_size")
    crop = processor.get("crop_size") or {}
    problems = []
    if processor.get("do_center_crop") is False or (crop.get("height"), crop.get("width")) != (image_size, image_size):
        problems.append(
            f"the image processor gives {crop.get('height')}x{crop.get('width')} px inputs but config.image_size is "
            f"{image_size}, so model(**processor(image)) and the image-feature-extraction pipeline fail: set size "
            f"{{\"shortest_edge\": {image_size}}}, crop_size {image_size}x{image_size} and do_center_crop true in "
            "preprocessor_config.json (training/export.py writes it so)"
        )
    if not isinstance(processor.get(TRAINING_SIZE_FIELD), int):
        problems.append(
            f"preprocessor_config.json records no {TRAINING_SIZE_FIELD} (the training resolution the card's dense "
            "snippets use): add the run's student_size"
        )
    return problems


def check_layout(folder: Path) -> Check:
    """Safetensors only, a config whose auto_map points at code files that are there, an image processor at the
    model's input size, and every figure the card shows from the folder."""
    problems = [
        f"pickle file {path.relative_to(folder)}" for path in folder.rglob("*") if path.suffix in PICKLE_SUFFIXES
    ]
    if not list(folder.glob("*.safetensors")):
        problems.append("no .safetensors weights")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    auto_map = config.get("auto_map", {})
    problems += [f"auto_map lacks {name}" for name in ("AutoConfig", "AutoModel") if name not in auto_map]
    modules = {reference.split(".")[0] for reference in auto_map.values()}
    problems += [f"{module}.py missing" for module in sorted(modules) if not (folder / f"{module}.py").is_file()]
    problems += image_processor_problems(folder, config)
    card_text = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    problems += [f"the card shows {link}, which is not in the folder" for link in CARD_IMAGE_LINK.findall(card_text)
                 if not (folder / link).is_file()]
    text_folder = folder / TEXT_ENCODER_SUBFOLDER
    if text_folder.is_dir() and not list(text_folder.glob("*.safetensors")):
        problems.append(f"{TEXT_ENCODER_SUBFOLDER}/ has no .safetensors weights")
    # The check's name is what reports and tests key on; card figures missing from the folder are listed too.
    return Check(
        "folder layout (safetensors, auto_map code, image processor, no pickles)", not problems, "; ".join(problems)
    )


def _loading_problems(info: dict) -> dict:
    return {name: value for name, value in info.items() if value}


def check_loads_with_package(folder: Path) -> tuple[Check, dict[str, torch.Tensor] | None]:
    """Load with `DeCLIPVisionModel` (and the text tower); returns outputs on a fixed input for the remote-code
    comparison."""
    try:
        # DeCLIPVisionModel, or DeCLIPEvaVisionModel for an EVA02 student: whichever class the folder's config names.
        model, info = declip_vision_class(folder).from_pretrained(folder, output_loading_info=True)
        problems = _loading_problems(info)
        text_folder = folder / TEXT_ENCODER_SUBFOLDER
        if text_folder.is_dir():
            _, text_info = CLIPTextModelWithProjection.from_pretrained(text_folder, output_loading_info=True)
            AutoTokenizer.from_pretrained(text_folder)
            problems |= {
                f"{TEXT_ENCODER_SUBFOLDER} {name}": value for name, value in _loading_problems(text_info).items()
            }
    except Exception as error:  # noqa: BLE001
        return Check("weights load with declip_hf", False, f"{type(error).__name__}: {error}"), None
    if problems:
        return Check("weights load with declip_hf", False, f"loading reported {problems}"), None
    side = model.config.image_size
    pixel_values = torch.randn(1, model.config.num_channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = {
            "pixel_values": pixel_values,
            "image_embeds": model.eval().get_image_features(pixel_values, return_dict=True).pooler_output,
            "dense_embeds": model.get_dense_features(pixel_values).dense_embeds,
        }
    return Check("weights load with declip_hf", True, type(model).__name__), outputs


def _run_scripts(jobs: dict[str, tuple[list[str], dict]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run the subprocesses concurrently (each costs seconds of imports) and wait for all of them."""
    processes = {
        name: subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (command, env) in jobs.items()
    }
    finished = {}
    for name, process in processes.items():
        try:
            output, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            output += f"\n(killed after {SUBPROCESS_TIMEOUT_S} s)"
        finished[name] = subprocess.CompletedProcess(process.args, process.returncode, output)
    return finished


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _remote_load_check(result: subprocess.CompletedProcess, outputs_file: Path, reference: dict) -> Check:
    name = "weights load without declip_hf (trust_remote_code)"
    if REMOTE_LOAD_VERIFIED not in result.stdout:
        return Check(name, False, _tail(result.stdout))
    remote = load_file(outputs_file)
    differences = {key: (remote[key] - reference[key]).abs().max().item() for key in ("image_embeds", "dense_embeds")}
    agree = all(difference <= 1e-5 for difference in differences.values())
    return Check(name, agree, f"max difference to the package's outputs {differences}")


def validate_release(folder: Path, repo_id: str, expect_results: bool = False) -> ValidationReport:
    """Cheap static checks first; the loading and snippet checks run only when those pass."""
    folder = Path(folder)
    checks = [check_card_metadata(folder, expect_results), check_layout(folder)]
    if not all(check.passed for check in checks):
        return ValidationReport(checks)
    try:
        snippets = extract_snippets((folder / "README.md").read_text())
    except ValueError as error:
        return ValidationReport(checks + [Check("card snippets are marked", False, str(error))])
    load_check, reference = check_loads_with_package(folder)
    checks.append(load_check)
    if reference is None:
        return ValidationReport(checks)
    with tempfile.TemporaryDirectory(prefix="declip_release_") as workdir:
        checks += _run_subprocess_checks(folder, repo_id, snippets, reference, Path(workdir))
    return ValidationReport(checks)


def snippet_environment(folder: Path, repo_id: str, workdir: Path) -> dict[str, str]:
    """Offline Hub cache holding `folder` as `repo_id`; remote code goes to a private HF_MODULES_CACHE, and
    PYTHONPATH lets a source checkout of declip_hf stand in for an installed one."""
    env = build_offline_hub_cache(workdir / "hub_cache", repo_id, folder)
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env | {"HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONPATH": python_path}


def run_snippet_scripts(
    scripts: dict[str, str], env: dict[str, str], workdir: Path
) -> dict[str, subprocess.CompletedProcess]:
    """Run one script per snippet kind, each after its kind's preamble, in `workdir`."""
    jobs = {}
    for kind, code in scripts.items():
        (workdir / f"snippets_{kind}.py").write_text(SNIPPET_PREAMBLES[kind] + code)
        jobs[kind] = ([sys.executable, f"snippets_{kind}.py"], env)
    return _run_scripts(jobs, cwd=workdir)


def _run_subprocess_checks(folder: Path, repo_id: str, snippets: dict, reference: dict, workdir: Path) -> list[Check]:
    save_file({"pixel_values": reference["pixel_values"].contiguous()}, workdir / "inputs.safetensors")
    remote_check = _REMOTE_CODE_CHECK.format(
        folder=str(folder), inputs="inputs.safetensors", outputs="outputs.safetensors", verified=REMOTE_LOAD_VERIFIED
    )
    scripts = {kind: "\n\n".join(blocks) for kind, blocks in snippets.items()}
    scripts["remote-code"] = remote_check + scripts.get("remote-code", "")
    results = run_snippet_scripts(scripts, snippet_environment(folder, repo_id, workdir), workdir)
    checks = [_remote_load_check(results["remote-code"], workdir / "outputs.safetensors", reference)]
    for kind, blocks in snippets.items():
        result = results[kind]
        detail = f"{len(blocks)} block(s)" if result.returncode == 0 else _tail(result.stdout)
        checks.append(Check(f"card snippets ({kind}) run offline as {repo_id}", result.returncode == 0, detail))
    return checks


# --------------------------------------------------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------------------------------------------------


def _public_name(name) -> str:
    """A Hub id as it is, a local path by its last component (a public commit message shows no local paths)."""
    return hub_id_or_none(name) or Path(str(name)).name


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def commit_message(run: TrainingRun) -> str:
    args, steps = run.args, run.summary.get("steps")
    student = _public_name(args.get("student", "CLIP"))
    details = ", ".join(
        part
        for part in (
            f"student {student}",
            f"VFM {', '.join(_public_name(teacher) for teacher in _as_list(args['vfm']))}" if args.get("vfm") else "",
            f"{steps} steps" if steps else "",
        )
        if part
    )
    return f"Release DeCLIP run {run.name}: {details}"


def push_release(folder: Path, repo_id: str, private: bool, message: str, token: str):
    """One `upload_folder` call is one commit: either the whole release lands or none of it does."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder, commit_message=message)
    except Exception as error:  # noqa: BLE001 - every failure gets the same clear message
        raise SystemExit(
            f"Push to {repo_id} failed ({type(error).__name__}: {error}). The upload is a single commit, so no "
            "file of this release was committed (the repository itself may have been created). Fix the cause and "
            "rerun with --push."
        ) from error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
        epilog=f"Project: {PROJECT_URL}",
    )
    parser.add_argument(
        "run_dir", type=Path, help="Training run directory (training/distill.py output: model/, training_args.json)."
    )
    parser.add_argument(
        "--repo-id", required=True, help="Hub repository to release to, as org/name; the card's snippets use it."
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="declip-evaluate results JSON; when not given, RUN_DIR/eval_results.json if that file exists.",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="Folder to assemble the release in; when not given, RUN_DIR/release."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a non-empty --out (RUN_DIR/release is always replaced)."
    )
    parser.add_argument(
        "--push", action="store_true", help="Upload the validated folder as one commit (needs a Hub token)."
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="Create the repository private (an existing repository keeps its visibility).",
    )
    parser.add_argument(
        "--space",
        type=Path,
        default=None,
        help="Also assemble a Hugging Face Space (Gradio demo of the release: app.py, requirements.txt, README.md) "
        "in this folder and validate it offline (--push uploads the model only); needs the demo extra "
        "(pip install 'declip-hf[demo]').",
    )
    parser.add_argument(
        "--license",
        default=None,
        help="Licence of the release; when not given, the base model's when known (OpenAI/LAION CLIP: mit).",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the starting CLIP, shown in the card instead of the run's student path; when not given, the "
        "run's student if it is a Hub id. A known OpenAI CLIP must match the model's architecture.",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="Hub id of a training dataset, shown instead of the run's dataset path (repeatable); when not given, "
        "the run's dataset if it is a Hub id.",
    )
    parser.add_argument(
        "--analysis-images",
        nargs="+",
        default=None,
        help="Image files or folders: the card then shows the proxy-token scores per layer of the released model "
        "and of --analysis-compare on them (declip-analyze; needs matplotlib, the [viz] extra).",
    )
    parser.add_argument(
        "--analysis-compare",
        default=None,
        help="The CLIP to compare with in the card's analysis figure; when not given, the run's student.",
    )
    return parser.parse_args(argv)


def _build_card(run: TrainingRun, args, results: dict | None, analysis: dict | None = None) -> ModelCard:
    base_model = args.base_model or hub_id_or_none(run.args.get("student"))
    license = args.license or default_license(base_model)
    if license is None:
        raise ValueError(
            "The licence of the starting checkpoint is unknown: pass --license (e.g. mit, apache-2.0, other)."
        )
    return build_model_card(run, args.repo_id, license, args.base_model, args.dataset, results, analysis=analysis)


def _analyse_for_card(run: TrainingRun, args, out: Path) -> dict:
    """Proxy-token scores of the run's model and its starting CLIP on --analysis-images, the figure written to
    `out`; labelled as the card names them (the repo id, the base model or the student's last path component)."""
    compare = args.analysis_compare or str(run.args.get("student", ""))
    if not compare:
        raise ValueError("The run records no student: pass --analysis-compare with the CLIP to compare with.")
    compare_label = (None if args.analysis_compare else args.base_model) or _public_name(compare)
    try:
        return release_analysis(run.model_dir, args.repo_id.split("/")[-1], compare, compare_label,
                                args.analysis_images, out)
    except ImportError as error:  # matplotlib missing: a user error with a named fix
        raise ValueError(str(error)) from None


def _read_inputs(args) -> tuple[TrainingRun, dict | None, ModelCard, Path]:
    """Everything the release reads from the user, checked before anything is written: the run, the results, the
    card they make, and the folder to assemble in."""
    run = TrainingRun.from_dir(args.run_dir)
    default_results = args.run_dir / "eval_results.json"
    results = load_results(args.results or (default_results if default_results.is_file() else None))
    card = _build_card(run, args, results)
    out = prepare_out_dir(
        args.out or args.run_dir / "release", args.run_dir, replace=args.overwrite or args.out is None
    )
    return run, results, card, out


# The Space (declip_hf.hub.space) needs Gradio: imported only when --space is given.


def _prepare_space(args, model_folder: Path) -> Path | None:
    """The empty --space folder, checked with the other inputs before anything is assembled (None without --space)."""
    if args.space is None:
        return None
    from .space import gradio_version, prepare_space_dir

    gradio_version()  # a missing demo extra is an input error, reported before any work
    return prepare_space_dir(args.space, args.run_dir, model_folder, replace=args.overwrite)


def _release_space(space_dir: Path, model_folder: Path, repo_id: str, card: ModelCard) -> ValidationReport:
    from .space import assemble_space, upload_hint, validate_space

    assemble_space(space_dir, repo_id, card.data.license)
    report = validate_space(space_dir, model_folder, repo_id)
    print(f"Space folder {space_dir}:\n{report}" + (f"\n{upload_hint(space_dir, repo_id)}" if report.passed else ""))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    token = get_token() if args.push else None
    if args.push and token is None:
        print("Refusing to push: no Hugging Face token. Run `hf auth login` or set HF_TOKEN.", file=sys.stderr)
        return 2
    try:
        run, results, card, out = _read_inputs(args)
        space_dir = _prepare_space(args, out)
        if args.analysis_images:
            card = _build_card(run, args, results, _analyse_for_card(run, args, out))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    left_out = assemble_release(run.model_dir, out, card)
    if left_out:
        print(f"Left out pickle files (only safetensors are released): {left_out}")
    report = validate_release(out, args.repo_id, expect_results=results is not None)
    print(f"Release folder {out}:\n{report}")
    if space_dir is not None and report.passed:
        report = ValidationReport(report.checks + _release_space(space_dir, out, args.repo_id, card).checks)
    if not report.passed:
        print(
            "Validation failed: " + ("refusing to push, nothing was uploaded." if args.push else "fix the above."),
            file=sys.stderr,
        )
        return 1
    if args.push:
        commit = push_release(out, args.repo_id, args.private, commit_message(run), token)
        print(f"Pushed {args.repo_id} at revision {commit.oid}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
