"""Layers point one way: the data pipeline and the metrics never import the model.

Checked on the source (every `import` and `from ... import`, also inside functions), so a lazy
import in a function body counts too.
"""

import ast
from pathlib import Path

import freeseg

PACKAGE = Path(freeseg.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_data_and_metrics_do_not_import_the_model():
    files = sorted((PACKAGE / "data").glob("*.py"))
    files += [PACKAGE / "evaluation" / f"{name}.py" for name in ("semantic", "panoptic", "instance")]
    assert len(files) > 5
    offenders = {str(f.relative_to(PACKAGE)): sorted(m for m in imported_modules(f) if m.startswith("freeseg.modeling"))
                 for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from freeseg.modeling.region_classifier import x\n")
    assert imported_modules(source) == {"freeseg.modeling.region_classifier"}
