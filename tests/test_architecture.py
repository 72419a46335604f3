"""The shape issue 23 asked for, kept: the script is the pipeline's story, the package its machinery."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cifar_distill.py"


def functions(path):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_script_is_short_and_its_functions_are_too():
    assert len(SCRIPT.read_text().splitlines()) <= 700
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions(SCRIPT) if f.end_lineno - f.lineno + 1 > 50}
    assert not long, long


def test_no_step_calls_another_step():
    for f in functions(SCRIPT):
        if f.name.startswith("step_"):
            called = {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            assert not {c for c in called if c.startswith("step_")}, f.name


def test_the_package_raises_its_own_errors_and_nothing_imports_the_script():
    for path in (ROOT / "flywheel").glob("*.py"):
        assert "SystemExit" not in path.read_text(), path.name
    for path in [*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "flywheel").glob("*.py")]:
        if path != SCRIPT:
            assert not re.search(r"^\s*(import|from) cifar_distill\b", path.read_text(), re.M), path.name
