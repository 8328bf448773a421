"""What the release and its demo Space share (DeCLIP, CVPR 2025, arXiv 2505.04410): check results, the empty
output folder, and an offline Hub cache that serves a folder under its repo id. Its own module so that
`declip_hf.hub.space` builds on it without importing `declip_hf.hub.release`, which imports the Space on demand."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding declip_hf/


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class ValidationReport:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def __str__(self) -> str:
        return "\n".join(
            f"[{'ok' if check.passed else 'FAILED'}] {check.name}" + (f": {check.detail}" if check.detail else "")
            for check in self.checks
        )


def prepare_out_dir(out: Path, run_dir: Path, replace: bool) -> Path:
    """An empty folder to assemble into; an existing non-empty one is replaced only when `replace` is set."""
    out, run_dir = out.resolve(), run_dir.resolve()
    if run_dir.is_relative_to(out) or out.is_relative_to(run_dir / "model"):
        raise ValueError(f"--out {out} overlaps the run's own files; choose a separate folder.")
    if out.exists() and any(out.iterdir()):
        if not replace:
            raise ValueError(f"{out} is not empty; pass --overwrite to replace it.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_offline_hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> dict[str, str]:
    """Lay `folder` out as the Hub cache snapshot of model `repo_id` (`models--org--name/{refs/main,
    snapshots/<commit>}`) and return an environment in which `from_pretrained(repo_id)` resolves it offline."""
    repo_cache = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo_cache / "refs").mkdir(parents=True, exist_ok=True)
    (repo_cache / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_cache / "snapshots" / commit, dirs_exist_ok=True)
    return {**os.environ, "HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
