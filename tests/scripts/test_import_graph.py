"""scripts/import_graph.py: the unit graph of a hand-made package, and a run on this package."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "patchsparse"
    for name, text in {"__init__.py": "from patchsparse.errors import E\n", "errors.py": "class E(Exception): ...\n",
                       **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_graph_marks_and_violations(tool, tmp_path):
    package = _package(tmp_path, {
        "utils.py": "import os\n",
        "models/__init__.py": "from .layers import f\n",                      # within the unit: no edge
        "models/layers.py": "from ..errors import E\nfrom patchsparse.io import atomic\n",  # upward, relative
        "io/__init__.py": "",
        "io/atomic.py": "import patchsparse.models.layers\n",                 # io -> models: allowed, and a cycle
        "masks/spec.py": "def g():\n    from patchsparse import models\n",  # in a function only
        "data/stream.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from patchsparse.models import layers\n",
        "learn/a.py": "from patchsparse.extract import b\n",                 # peer
        "extract/b.py": "from patchsparse import masks, utils\n",             # `from pkg import sub`: the subpackage
        "newthing/__init__.py": "",
    })
    graph = tool.unit_graph(package)
    assert {a: set(b) for a, b in graph.items()} == {
        "patchsparse": {"errors"}, "errors": set(), "utils": set(), "models": {"errors", "io"}, "io": {"models"},
        "masks": {"models"}, "data": {"models"}, "learn": {"extract"}, "extract": {"masks", "utils"}, "newthing": set()}
    [site] = graph["models"]["io"]
    assert (site.source, site.target, site.where, site.deferred) == ("patchsparse.models.layers", "patchsparse.io.atomic",
                                                                     "layers.py:2", False)
    assert graph["masks"]["models"][0].deferred and graph["data"]["models"][0].type_only
    bad, unplaced = tool.layer_violations(graph, tool.LAYERS)
    assert bad == [("data", "models", "upward"), ("learn", "extract", "sideways"), ("models", "io", "upward")]
    assert unplaced == ["newthing"]
    assert tool.cycles(graph) == [["io", "models"]]
    text, count = tool.report(package)
    assert count == 3 + 1 + 1
    assert re.search(r"^  masks +-> models\*$", text, re.M) and re.search(r"^  data +-> modelst$", text, re.M)
    assert "cycles between units: 1\n  io <-> models" in text and "units no layer names: newthing" in text
    assert tool.main(["--root", str(package)]) == 0
    assert tool.main(["--check", "--root", str(package)]) == 1


def test_check_passes_a_layered_package_and_refuses_a_bad_root(tool, tmp_path, capsys):
    package = _package(tmp_path, {"utils.py": "from patchsparse.errors import E\n",
                                  "masks/__init__.py": "from patchsparse.models import x\nfrom patchsparse import utils\n",
                                  "models/__init__.py": "x = 1\n", "cli/main.py": "import patchsparse.masks\n"})
    assert tool.main(["--check", "--root", str(package)]) == 0
    assert "upward or sideways imports: 0\ncycles between units: 0" in capsys.readouterr().out
    assert tool.main(["--check", "--root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("import_graph: error:") and len(err.splitlines()) == 1


def test_runs_on_this_package():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    units = {p.name for p in (REPO / "src" / "patchsparse").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    listed = set(re.findall(r"^  (\S+) +->", run.stdout, re.M))
    assert units | {"patchsparse", "errors", "utils", "records", "__main__"} <= listed
    assert re.search(r"^  __main__ +-> cli$", run.stdout, re.M)
    assert "units no layer names" not in run.stdout  # every unit has its place in the layering
    count = sum(int(n) for n in re.findall(r"^(?:upward or sideways imports|cycles between units): (\d+)$",
                                           run.stdout, re.M))
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == (1 if count else 0)


def test_this_package_has_no_upward_import_and_no_cycle():
    """The layering holds: a new upward or sideways import, or a cycle, fails here with the offending line."""
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout[check.stdout.find("upward or sideways"):]
    assert "upward or sideways imports: 0\ncycles between units: 0" in check.stdout
