"""The package's shape, read from its source with `ast` (nothing is imported):

- no import cycle between modules (imports inside functions count too);
- no upward import: every module sits in a layer of `LAYERS` and imports only from
  its own layer or below (the layers are docs/architecture.md's boxes);
- no private name (``_x``) imported from, or reached into, another module;
- no file over 500 lines, and no source citing a document outside the repository.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from testutil import REPO_ROOT

PACKAGE = Path(REPO_ROOT) / "dwt_jax"

# Lowest first. A module belongs to the layer of the longest entry that prefixes its
# name (``data`` covers ``data.corpus``; ``finetune.compare`` is listed on its own).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "hostenv"),
    ("readers", "losses", "layer_maps", "fused_head", "fused_loss", "sparse_loss", "logs"),
    ("models", "config_files", "remap", "optim", "flops", "metrics", "speedup"),
    ("schema", "hf", "data", "distill"),
    ("sharding", "distributed", "state", "checkpoint", "steps"),
    ("objectives",),
    ("configuration", "teachers", "inputs", "stages"),
    ("loop", "driver"),
    ("train", "finetune"),
    ("experiment",),
    (
        "memory",
        "plan",
        "export",
        "generate",
        "study",
        "finetune.compare",
        "cli",
        "main",
        "cache_teacher",
    ),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        modules[name] = path
    return modules


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute dotted name (without 'dwt_jax.') an ImportFrom reads from."""
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
        return base
    return base.removeprefix("dwt_jax").lstrip(".") if base.startswith("dwt_jax") else ""


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """(module → the package modules it imports, private names crossing modules)."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    private: list[str] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases: dict[str, str] = {}  # Local name → package module it binds.
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                if not base and not (node.module or "").startswith("dwt_jax"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    target = full if full in MODULES else base
                    if target in MODULES and target != module:
                        edges[module].add(target)
                    if full in MODULES:
                        aliases[alias.asname or alias.name] = full
                    elif alias.name.startswith("_"):
                        private.append(f"{module} imports {alias.name} from {base}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("dwt_jax."):
                        target = alias.name.removeprefix("dwt_jax.")
                        edges[module].add(target)
                        aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                private.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    return edges, private


def _layer(module: str) -> int:
    best, layer = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, layer = len(name), index
    if layer is None:
        raise AssertionError(f"dwt_jax.{module} is in no layer of LAYERS; add it.")
    return layer


def test_every_module_has_a_layer():
    for module in MODULES:
        if module:  # The package's own __init__.
            _layer(module)


def test_no_upward_import():
    edges, _ = _imports()
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in edges.items()
        if m
        for t in targets
        if t and _layer(t) > _layer(m)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    edges, _ = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components.
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_crosses_modules():
    _, private = _imports()
    assert not private, "\n".join(private)


def test_walker_sees_what_it_must():
    """The walker finds known edges, so the tests above cannot pass by reading nothing."""
    edges, _ = _imports()
    assert "driver" in edges["train"]
    assert "errors" in edges["configuration"]
    assert "loop" in edges["driver"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_files_stay_under_500_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{path.relative_to(REPO_ROOT)} has {lines} lines; split it by concern"


def test_sources_cite_only_the_repository():
    roots = [Path(REPO_ROOT) / d for d in ("dwt_jax", "configs", "tests", "benchmarks", "launch")]
    here = Path(__file__).resolve()
    cited = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for root in roots
        for path in root.rglob("*")
        if path.suffix in (".py", ".sh", ".sbatch", ".md") and path.resolve() != here
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bSPEC\b", line)
    ]
    assert not cited, f"cite docs/methods.md instead: {cited}"
    assert (Path(REPO_ROOT) / "docs" / "methods.md").is_file()
