"""The package layout (README "Layout"): subpackages models/, segmentation/ and hub/ with no import cycles, none of
them importing the package root, and model code that a saved folder can carry for `trust_remote_code`."""

import ast
from pathlib import Path

import pytest

import declip_hf

PACKAGE_DIR = Path(declip_hf.__file__).resolve().parent
SUBPACKAGES = ("models", "segmentation", "hub")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in path.parts}


def imported_modules(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its code, function-level (lazy) imports included."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import module` imports the module; `from pkg import name` imports pkg.
            found.update(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target
                         for alias in node.names)
    return (found & set(MODULES)) - {name}


def group(name: str) -> str:
    """A subpackage stands for all its modules; each top-level module stands for itself."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else name


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node):
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for neighbour in sorted(edges.get(node, ())):
            cycle = visit(neighbour)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    return next(filter(None, (visit(node) for node in sorted(edges))), None)


def test_the_subpackages_exist():
    for subpackage in SUBPACKAGES:
        assert f"declip_hf.{subpackage}" in MODULES, f"declip_hf/{subpackage}/__init__.py is missing"


def test_no_import_cycle_between_modules_or_between_subpackages():
    modules = {name: imported_modules(name) for name in MODULES}
    assert find_cycle(modules) is None, f"import cycle: {' -> '.join(find_cycle(modules))}"
    groups: dict[str, set[str]] = {}
    for name, targets in modules.items():
        groups.setdefault(group(name), set()).update(group(target) for target in targets)
    groups = {name: targets - {name} for name, targets in groups.items()}
    assert find_cycle(groups) is None, f"import cycle between subpackages: {' -> '.join(find_cycle(groups))}"


def test_no_module_imports_the_package_root():
    """declip_hf/__init__.py imports the subpackages; a module importing it back would close a cycle."""
    offenders = sorted(name for name in MODULES if name != "declip_hf" and "declip_hf" in imported_modules(name))
    assert not offenders, f"these modules import declip_hf/__init__.py; import the defining module instead: {offenders}"


MODEL_CODE = sorted(name for name in MODULES if name.split(".")[-1].startswith(("configuration_", "modeling_")))


@pytest.mark.parametrize("name", MODEL_CODE)
def test_model_code_imports_only_its_siblings_with_single_dot_imports(name):
    """save_pretrained copies a model's module and the files it imports as `from .x import`; anything else (`..x`,
    `declip_hf.x`) would be missing from a saved folder loaded with trust_remote_code=True."""
    assert name.startswith("declip_hf.models."), f"{name} belongs in declip_hf/models/"
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module, f"{name}: `from {'.' * node.level}{node.module or ''} import`"
            assert (MODULES[name].parent / f"{node.module}.py").is_file(), f"{name} imports .{node.module}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            absolute = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not any(module.startswith("declip_hf") for module in absolute), f"{name} imports {absolute}"
