"""The code's layout, as kd wants it to read (line length and formatting are ruff's, which
`make test` runs before the tests):

- train.py is at most 300 lines: the loop reads top to bottom, everything else is in kd/;
- no function in kd/, train.py, generate.py or scripts/ is over 80 lines (def to last line);
- no script imports train.py or another script: what they share lives in kd/;
- no kd module imports another module's private (_underscore) names.

Run: `.venv/bin/python -m pytest -q tests/test_layout.py`.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    [*REPO.glob("kd/*.py"), *REPO.glob("scripts/*.py"), REPO / "train.py", REPO / "generate.py"]
)


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in a file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_train_py_is_at_most_300_lines():
    lines = len((REPO / "train.py").read_text().splitlines())
    assert lines <= 300, f"train.py has {lines} lines; move what is not the loop into kd/"


def test_no_function_is_over_80_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - first + 1 > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long, f"functions over 80 lines: {long}"


def test_scripts_import_kd_not_train_py_or_each_other():
    scripts = {p.stem for p in REPO.glob("scripts/*.py")} | {"train", "generate"}
    bad = []
    for path in [*REPO.glob("scripts/*.py"), *REPO.glob("kd/*.py")]:
        for module, _ in imports(parsed(path)):
            if module.split(".")[0] in scripts:
                bad.append(f"{path.relative_to(REPO)} imports {module}")
    assert not bad, bad


def test_no_kd_module_imports_private_names():
    bad = []
    for path in SOURCES:
        for module, names in imports(parsed(path)):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if module.startswith("kd") and private:
                bad.append(f"{path.relative_to(REPO)}: from {module} import {private}")
    assert not bad, bad
