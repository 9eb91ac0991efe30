"""The shape a reader relies on: modules small enough to read in a sitting, utils.py in the notebook's order
with no section reaching into a later one, short functions with few parameters, short notebook cells."""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["utils.py", "training.py", "retrieval.py", "plots.py", "preflight.py", "runtime.py", "biomedclip_offline.py",
           "demo_data.py"]
MAX_LINES = {"utils.py": 1900, "training.py": 800}


def functions(path: Path) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]


@pytest.mark.parametrize("module", MODULES)
def test_lines_are_at_most_120_characters(module):
    long = [i for i, line in enumerate((ROOT / module).read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"{module}: lines {long} are longer than 120 characters"


@pytest.mark.parametrize("module", sorted(MAX_LINES))
def test_modules_stay_readable_in_a_sitting(module):
    n = len((ROOT / module).read_text().splitlines())
    assert n <= MAX_LINES[module], f"{module} has {n} lines (at most {MAX_LINES[module]})"


@pytest.mark.parametrize("module", MODULES[:-1])  # the method's modules and tooling, not the demo generator
def test_functions_are_short_and_public_ones_take_few_parameters(module):
    for fn in functions(ROOT / module):
        length = fn.end_lineno - fn.lineno + 1
        assert length <= 50, f"{module}:{fn.lineno} {fn.name} is {length} lines long (at most 50)"
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        count = len([a for a in args if a.arg not in ("self", "cls")])
        if not fn.name.startswith("_"):
            assert count <= 8, f"{module}:{fn.lineno} {fn.name} takes {count} parameters (at most 8)"


def test_notebook_code_cells_are_at_most_12_lines():
    nb = json.loads((ROOT / "entrep-prototypical.ipynb").read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and "parameters" not in cell["metadata"].get("tags", []):
            n = len("".join(cell["source"]).splitlines())
            assert n <= 12, f"cell {i} has {n} lines (at most 12):\n" + "".join(cell["source"])


def test_utils_sections_never_reach_into_a_later_section():
    """utils.py reads top to bottom in the notebook's order: a name is used only in its own section or after it."""
    source = (ROOT / "utils.py").read_text()
    starts = [i for i, line in enumerate(source.splitlines(), 1) if re.match(r"^# \d+\. ", line)]
    assert len(starts) >= 8, "utils.py keeps numbered sections"
    section = lambda line: sum(start <= line for start in starts)
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        defined |= {name: section(node.lineno) for name in names}
    forward = sorted({(node.name if hasattr(node, "name") else node.lineno, use.id)
                      for node in tree.body for use in ast.walk(node)
                      if isinstance(use, ast.Name) and defined.get(use.id, 0) > section(node.lineno)})
    assert not forward, f"names used before the section that defines them: {forward}"
