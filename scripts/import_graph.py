#!/usr/bin/env python3
"""The package's internal import structure, and the imports that break its layering.

    python scripts/import_graph.py            # print the graph and the violations; exit 0
    python scripts/import_graph.py --check    # exit 1 if there is any violation

A *unit* is a subpackage (`learn`, `masks`, ...) or a top-level module (`errors`, `utils`, ...);
`patchsparse` itself stands for the package's `__init__.py`. Every `import` counts, also those inside
functions (marked `*` in the graph: deferred, but still a dependency) and those under
`TYPE_CHECKING` (marked `t`). Only the standard library's `ast` reads the files: nothing is
imported, so the tool runs without torch.

The layering, bottom to top (LAYERS below). A unit may import only units of lower layers; units of
one layer are peers and do not import one another:

    errors                   the one exception type
    version, utils, network, atomic  the package version; logging, progress, cache directory; the hub
                             probe; atomic file writes
    native                   building C++ kernels on first use
    data                     text -> token windows (knows no model)
    models                   loading models, finding their linear layers
    masks                    the mask spec, N:M patterns, tile math
    io                       mask files, atomic writes, export
    records                  the JSON record of a command
    prior, kernels, evaluate one-shot pruners and priors; hybrid kernels; perplexity and zero-shot
    learn, extract, reconstruct  mask learning; hard masks from learned logits; weight reconstruction
    pipeline, inference      prior -> learn -> extract -> reconstruct, and scoring; sparse models for generation
    report, patchsparse      figures and tables from run directories; the package root (its public face,
                             which hands out `load_sparse`)
    cli                      argument parsing, one module per command
    __main__                 `python -m patchsparse`

Violations: an import of a higher unit (upward) or of a peer (sideways), a cycle between units, and a
unit that no layer names (add it to LAYERS where it belongs).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "patchsparse"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("version", "utils", "network", "atomic"),
    ("native",),
    ("data",),
    ("models",),
    ("masks",),
    ("io",),
    ("records",),
    ("prior", "kernels", "evaluate"),
    ("learn", "extract", "reconstruct"),
    ("pipeline", "inference"),
    ("report", PACKAGE),
    ("cli",),
    ("__main__",),
)
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


@dataclass(frozen=True)
class Import:
    source: str      # importing module, dotted
    target: str      # imported module, dotted
    where: str       # file:line
    deferred: bool   # inside a function
    type_only: bool  # under `if TYPE_CHECKING:`


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name of every module of the package under `root` (its `__init__.py` directory)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """The package-internal imports in one file, each resolved to the module it loads."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, deferred: bool, type_only: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            deferred = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, deferred, True)
            for child in node.orelse:
                visit(child, deferred, type_only)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            # `from pkg import sub` loads the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in dict.fromkeys(targets):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.append(Import(module, target, f"{path.name}:{node.lineno}", deferred, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, deferred, type_only)

    visit(tree, False, False)
    return found


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def unit_graph(root: Path) -> dict[str, dict[str, list[Import]]]:
    """unit -> imported unit -> the imports behind that edge (imports within a unit left out);
    every unit of the package is a key, also one that imports nothing."""
    names = module_names(root)
    graph: dict[str, dict[str, list[Import]]] = {unit_of(module): defaultdict(list) for module in names}
    # every module and every package above one (also a directory without `__init__.py`)
    known = {".".join(m.split(".")[:i]) for m in names for i in range(1, m.count(".") + 2)}
    for module, path in names.items():
        for imp in imports_of(module, path, known):
            a, b = unit_of(imp.source), unit_of(imp.target)
            if a != b:
                graph[a][b].append(imp)
    return graph


def cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The strongly connected groups of more than one unit (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(set(graph) | {w for edges in graph.values() for w in edges}):
        if v not in index:
            strongconnect(v)
    return sorted(groups)


def layer_violations(graph: dict[str, dict[str, list[Import]]],
                     layers: tuple[tuple[str, ...], ...]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(importer, imported, 'upward' | 'sideways') for each edge that breaks the layering, and the
    units no layer names."""
    level = {unit: i for i, layer in enumerate(layers) for unit in layer}
    units = set(graph) | {w for edges in graph.values() for w in edges}
    unplaced = sorted(units - set(level))
    bad = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if a in level and b in level and level[b] >= level[a]:
                bad.append((a, b, "upward" if level[b] > level[a] else "sideways"))
    return bad, unplaced


def _mark(imps: list[Import]) -> str:
    if all(i.type_only for i in imps):
        return "t"
    return "*" if all(i.deferred for i in imps) else ""


def _sites(imps: list[Import]) -> str:
    return ", ".join(f"{i.source.split('.', 1)[-1]}:{i.where.split(':')[1]} {i.target}"
                     + (" (in a function)" if i.deferred else "") + (" (TYPE_CHECKING)" if i.type_only else "")
                     for i in imps)


def report(root: Path, layers: tuple[tuple[str, ...], ...] = LAYERS) -> tuple[str, int]:
    """The printed report and the number of violations."""
    graph = unit_graph(root)
    lines = [f"{root.name}: internal imports by unit (* only inside functions, t only under TYPE_CHECKING)",
             "layers, bottom -> top: " + " | ".join(", ".join(layer) for layer in layers), ""]
    width = max(map(len, graph), default=0)
    level = {unit: i for i, layer in enumerate(layers) for unit in layer}
    for a in sorted(graph, key=lambda u: (level.get(u, len(layers)), u)):
        edges = ", ".join(b + _mark(graph[a][b]) for b in sorted(graph[a], key=lambda u: (level.get(u, len(layers)), u)))
        lines.append(f"  {a:<{width}} -> {edges or '(nothing)'}")
    bad, unplaced = layer_violations(graph, layers)
    groups = cycles(graph)
    lines += ["", f"upward or sideways imports: {len(bad)}"]
    lines += [f"  {a} -> {b} ({kind}): {_sites(graph[a][b])}" for a, b, kind in bad]
    lines += [f"cycles between units: {len(groups)}"]
    lines += ["  " + " <-> ".join(group) for group in groups]
    if unplaced:
        lines += [f"units no layer names: {', '.join(unplaced)}"]
    return "\n".join(lines), len(bad) + len(groups) + len(unplaced)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any import breaks the layering")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the package directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.root / "__init__.py").is_file():
        print(f"import_graph: error: {args.root} is not a package directory (no __init__.py)", file=sys.stderr)
        return 2
    try:
        text, violations = report(args.root)
    except SyntaxError as exc:
        print(f"import_graph: error: cannot parse {exc.filename}:{exc.lineno}", file=sys.stderr)
        return 2
    print(text)
    return 1 if args.check and violations else 0


if __name__ == "__main__":
    sys.exit(main())
