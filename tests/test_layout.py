"""The package's layout rules, read from the source: data flows one way through the
subpackages, and no private name is used outside its module."""

from __future__ import annotations

import ast
from pathlib import Path

import nctools

PACKAGE = Path(nctools.__file__).parent
# bottom to top: a stage may import only from the stages before it (and from itself)
STAGES = ("_version", "errors", "limits", "config", "data", "models", "metrics", "runs", "training",
          "analysis", "integrations", "cli", "__main__")
ROOT = "nctools"  # the package itself: its lazy __init__ (the version, the public names)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def nctools_imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import of nctools, at any depth
    (the lazy function-level imports too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == ROOT:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names
                      if a.name.split(".")[0] == ROOT]
    return found


def sources() -> list[tuple[str, ast.AST]]:
    return [(module_name(p), ast.parse(p.read_text(), str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_stage_imports_only_from_the_stages_below_it():
    unknown, upward = [], []
    for module, tree in sources():
        here = stage(module)
        if here in (ROOT, "configs"):  # the lazy front door names everything; configs is data
            continue
        if here not in STAGES:
            unknown.append(module)
            continue
        for target, names, line in nctools_imports(tree):
            targets = [f"{ROOT}.{n}" for n in names] if target == ROOT else [target]
            for name in targets:
                there = stage(name)
                if there in (ROOT, here):
                    continue
                if there not in STAGES or STAGES.index(there) >= STAGES.index(here):
                    upward.append(f"{module}:{line} imports {name}")
    assert not unknown, f"modules outside the known stages: {unknown}"
    assert not upward, "imports against the flow:\n" + "\n".join(upward)


def test_no_private_name_is_used_outside_its_module():
    used = []
    for module, tree in sources():
        aliases = set()  # local names bound to nctools modules
        for target, names, line in nctools_imports(tree):
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    used.append(f"{module}:{line} imports {target}.{name}")
                aliases.add(name)
            if not names:
                aliases.add(target.split(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                used.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not used, "private names used across modules:\n" + "\n".join(used)


def test_the_checks_see_the_imports_they_judge():
    """The rules are not vacuous: the tree has cross-stage imports, lazy ones included."""
    counts = {module: len(nctools_imports(tree)) for module, tree in sources()}
    assert counts["nctools.training.loop"] >= 5
    lazy = [module for module, tree in sources()
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for inner in ast.walk(node) if isinstance(inner, ast.ImportFrom)
            and (inner.module or "").startswith(ROOT)]
    assert "nctools.cli" in lazy


def test_the_version_is_one_fact_at_the_bottom():
    """``_version.py`` imports nothing, the packaging reads it, and the package exports it."""
    import tomllib

    from nctools import _version
    tree = ast.parse((PACKAGE / "_version.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "nctools._version.__version__"
    assert nctools.__version__ is _version.__version__
