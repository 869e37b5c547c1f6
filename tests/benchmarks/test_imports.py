"""The benchmark scripts import the installed package: none of them puts `src` on sys.path."""

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_edits_sys_path():
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 7
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                raise AssertionError(f"{script.name}:{node.lineno} touches sys.path")
