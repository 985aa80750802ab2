"""The package's shape: folders of one concern each, imports that run one way down its layers and never in a
cycle, light modules free of torch, and the endpoint advisor kept out of the worker. Read from the source itself,
imports inside functions included."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "worker_transformers"

# Modules that run before the heavy imports or in tools that never need a tensor.
LIGHT = (
    "config",
    "local",
    "model.errors",
    "model.folder",
    "model.hf_cache",
    "model.manifest",
    "model.weights",
    "model.download",
    "model.volume",
    "model.sources",
    "startup.budget",
    "startup.prefetch",
    "startup.readahead",
    "startup.collector",
    "serving.schema",
    "serving.images",
    "serving.shutdown",
    "serving.renderer",
    "generation.errors",
    "generation.textstream",
    "serving.openai.protocol",
    "serving.openai.bodies",
    "advisor.cli",
    "advisor.footprint",
    "advisor.model_facts",
    "advisor.plan",
    "advisor.gpus",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """The package's modules that `path` imports anywhere in its body (functions included)."""
    name = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")
                base = ".".join([*package, base] if base else package)
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(t for t in targets if t.startswith(PACKAGE + ".") and t in MODULES)
    found.discard(name)
    return found


MODULES = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
GRAPH = {name: package_imports(path) for name, path in MODULES.items()}

# The package's layers, lowest first: a module imports from its own layer and the layers below it, never from one
# above. The entry points (the modules at the top of the package, and the advisor's command) sit above them all.
LAYERS = ("config", "startup", "model", "loading", "generation", "serving", "entry points")
ENTRY_POINTS = ("worker", "local", "openai_server", "advisor")


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else module
    return LAYERS.index("entry points" if part in ENTRY_POINTS else part)


def test_no_two_modules_import_each_other_even_inside_functions():
    cycles = []
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(GRAPH[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_imports_run_one_way_down_the_layers_never_up():
    climbing = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module != PACKAGE
        for target in targets
        if layer(target) > layer(module)
    )
    assert not climbing, "imports that climb a layer: " + "; ".join(climbing)


def test_every_folder_is_a_layer_and_no_layer_is_crowded():
    """About a dozen modules a folder at most, so a folder stays one concern a reader takes in at a glance."""
    for folder in (SRC / PACKAGE).iterdir():
        if folder.is_dir() and (folder / "__init__.py").exists():
            layer(f"{PACKAGE}.{folder.name}")  # a folder outside LAYERS and ENTRY_POINTS raises here
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            assert len(modules) <= 12, f"{folder.name}/ holds {len(modules)} modules"


def test_the_worker_never_imports_the_endpoint_advisor():
    advisor = f"{PACKAGE}.advisor"
    outside = {m: deps for m, deps in GRAPH.items() if not m.startswith(advisor)}
    leaks = {m: sorted(d for d in deps if d.startswith(advisor)) for m, deps in outside.items()}
    assert not {m: d for m, d in leaks.items() if d}


def test_only_entry_points_sit_at_the_top_of_the_package():
    top = sorted(p.stem for p in (SRC / PACKAGE).glob("*.py") if p.stem != "__init__")
    assert top == ["config", "local", "openai_server", "worker"]


@pytest.mark.parametrize("module", LIGHT)
def test_a_light_module_imports_no_torch_or_transformers_in_a_fresh_interpreter(module):
    code = (
        f"import sys, {PACKAGE}.{module}\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or result.stdout
