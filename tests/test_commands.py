"""The console scripts (pyproject.toml [project.scripts] -> declip_hf.commands): each one is `python -m <module>`.

The scripts are run as pip's generated wrapper runs them (`sys.exit(<entry point>())` with argv[0] the script's
name) through `sys.executable`, so the tests do not depend on the scripts being on PATH."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

from PIL import Image

from declip_hf import commands
from tests.conftest import REPO_ROOT

SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    module, _, attribute = SCRIPTS[name].partition(":")
    wrapper = f"import sys\nfrom {module} import {attribute}\nsys.argv[0] = {name!r}\nsys.exit({attribute}())\n"
    return subprocess.run(
        [sys.executable, "-c", wrapper, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_every_script_is_a_command_and_every_command_a_script():
    assert set(SCRIPTS) == set(commands.COMMANDS)
    for name, target in SCRIPTS.items():
        module, _, attribute = target.partition(":")
        assert module == "declip_hf.commands" and callable(getattr(commands, attribute)), target
        spec = importlib.util.find_spec(commands.COMMANDS[name])
        assert spec is not None, f"{name} runs {commands.COMMANDS[name]}, which does not exist"
        assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(), f"{spec.origin} has no __main__ block"


def test_every_script_shows_its_help_under_its_own_name():
    # One interpreter for all six: argparse ends each `--help` with SystemExit(0).
    names = sorted(SCRIPTS)
    code = (
        "import sys\nfrom declip_hf import commands\n"
        f"for name, attribute in {[(name, SCRIPTS[name].partition(':')[2]) for name in names]!r}:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        getattr(commands, attribute)()\n"
        "    except SystemExit as exit:\n"
        "        print(f'{name} exited {exit.code}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in names:
        assert f"usage: {name} " in result.stdout, f"{name}: no usage line naming the script"
        assert f"{name} exited 0" in result.stdout


def test_segment_script_writes_the_overlay_and_exits_zero(tmp_path, tiny_clip_dir):
    """The module's `main()` returns the overlay image: the script must not hand it to `sys.exit` (status 1)."""
    Image.new("RGB", (20, 16), (10, 200, 30)).save(tmp_path / "in.png")
    out = tmp_path / "overlay.png"
    result = run_script(
        "declip-segment", str(tmp_path / "in.png"), "--labels", "grass,sky", "--out", str(out),
        "--model", str(tiny_clip_dir), "--shorter-side", "16", "--window", "16", "--stride", "8",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Wrote" in result.stdout and Image.open(out).width > 20
    # runpy warns when the package's import already loaded the module it is about to run as __main__.
    assert "RuntimeWarning" not in result.stderr


def test_a_user_error_ends_the_script_with_status_two(tmp_path):
    result = run_script("declip-evaluate", "--model", "m", "--benchmarks", "no_such_benchmark", "--output",
                        str(tmp_path / "r.json"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "no_such_benchmark" in result.stderr
    assert "Traceback" not in result.stderr
