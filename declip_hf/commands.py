"""The console scripts of pyproject.toml's [project.scripts]: `declip-segment`, `declip-evaluate`, ... each runs one
command-line module exactly as `python -m <module>` does.

Running the module as `__main__` (rather than calling its `main()`) keeps the two ways identical: a module's
`main()` returns its result to Python callers (an image, a results dict, a path), which `sys.exit` in the
generated script would print and turn into exit status 1, and a module's `__main__` block may set up more
(logging, the exit status of `declip-release`).
"""

import runpy
from collections.abc import Callable

# Script name -> the module it runs.
COMMANDS = {
    "declip-segment": "declip_hf.segmentation.segment",
    "declip-evaluate": "declip_hf.segmentation.evaluate",
    "declip-demo": "declip_hf.segmentation.demo",
    "declip-analyze": "declip_hf.analyze",
    "declip-release": "declip_hf.hub.release",
    "declip-convert": "declip_hf.hub.convert_open_clip_to_hf",
}


def _console_script(name: str) -> Callable[[], None]:
    module = COMMANDS[name]

    def run() -> None:
        # alter_sys=False keeps sys.argv[0] the script's name, so usage lines read `usage: declip-segment ...`.
        runpy.run_module(module, run_name="__main__", alter_sys=False)

    run.__doc__ = f"`{name}`: runs `python -m {module}`."
    return run


segment = _console_script("declip-segment")
evaluate = _console_script("declip-evaluate")
demo = _console_script("declip-demo")
analyze = _console_script("declip-analyze")
release = _console_script("declip-release")
convert = _console_script("declip-convert")
