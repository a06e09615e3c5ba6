"""The package's modules import each other only along ARCHITECTURE.md's arrows: a stage imports the
stages before it, its own stage's other module, and the modules beside them (registry, config, checks,
version, dashboards, sharding), never a later one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_ntk"

# ARCHITECTURE.md's diagram, stage by stage: each may import any module of an earlier stage or its own
# (layers plans blocks, rewrites attention and falls back to jacobian; attribution takes predictions from metrics).
STAGES = [
    ["task"],
    ["jacobian", "attention", "blocks", "layers"],
    ["projection"],
    ["featurize"],
    ["kernels"],
    ["store"],
    ["surrogate"],
    ["metrics", "attribution"],
    ["datamodeling"],
    ["pipeline"],
    ["callback"],
]
BESIDE = {  # importable by every stage; what they may import themselves
    "version": set(),
    "checks": set(),
    "errors": set(),  # the library's exception types: built-in bases only
    "registry": set(),
    "config": {"checks", "projection"},  # projection's option checks: pure torch, no Lightning
    "dashboards": set(),  # what the callback logs to (callback ─► dashboards): it imports nothing of the package
    "sharding": set(),  # the collectives of a fit sharded over ranks: torch.distributed only
}
# Edges against the arrows that remain until the modules are split: the surrogate takes the predicted
# classes from metrics.
ALLOWED_FOR_NOW = {("surrogate", "metrics")}


def allowed_imports(module: str) -> set[str]:
    if module in BESIDE:
        return BESIDE[module]
    rank = next(i for i, stage in enumerate(STAGES) if module in stage)
    earlier = {m for stage in STAGES[: rank + 1] for m in stage} - {module}
    return earlier | set(BESIDE) | {target for source, target in ALLOWED_FOR_NOW if source == module}


def package_imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


def test_every_module_is_placed_in_the_architecture():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    placed = {m for stage in STAGES for m in stage} | set(BESIDE)
    assert modules == placed


def test_modules_import_only_earlier_stages_and_the_modules_beside_them():
    imports = {path.stem: package_imports(path) for path in PACKAGE.glob("*.py")}
    assert not [(a, b) for stage in STAGES for a in stage for b in stage if a < b and b in imports[a] and a in imports[b]]  # no cycle within a stage
    wrong = {
        (path.stem, target)
        for path in PACKAGE.glob("*.py")
        if path.stem != "__init__"
        for target in package_imports(path) - allowed_imports(path.stem)
    }
    assert not wrong, f"imports against ARCHITECTURE.md's order (module, imported): {sorted(wrong)}"
