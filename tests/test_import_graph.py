"""Imports flow one way: the library ``mdgru_keras`` never imports the checkout's entry points and tools.

``train/`` (entry-point scripts), ``serving/`` (deployment files), ``bench/`` and ``tests/`` use the library;
they are not installed, so a library module importing them would work in a checkout and fail once installed.
Every module under mdgru_keras/ is parsed (not imported), imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "mdgru_keras"
FORBIDDEN = ("train", "serving", "bench", "tests")


def forbidden_imports(path: Path) -> list[str]:
    """``"LINE: import ..."`` for every import in ``path`` of a top-level name in :data:`FORBIDDEN`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            text = "import " + ", ".join(names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            text = f"from {node.module} import " + ", ".join(alias.name for alias in node.names)
        else:
            continue  # relative imports stay inside the package
        if any(name.split(".")[0] in FORBIDDEN for name in names):
            found.append(f"{node.lineno}: {text}")
    return found


def test_the_library_imports_no_entry_point_or_tool_package() -> None:
    modules = sorted(LIBRARY.rglob("*.py"))
    assert len(modules) > 40 and LIBRARY / "serving" / "grpc_server.py" in modules
    problems = [
        f"{path.relative_to(LIBRARY.parent)}:{found}" for path in modules for found in forbidden_imports(path)
    ]
    assert not problems, "mdgru_keras imports outside the library:\n" + "\n".join(problems)


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "import os\n"
        "from mdgru_keras.serving import connect\n"
        "def run():\n"
        "    from serving.loadtest import main\n"
        "    import train.model_afids, numpy\n"
        "    from . import sibling\n"
        "class Cases:\n"
        "    def method(self):\n"
        "        import bench.bench_layer as b\n"
        "        from tests import conftest\n"
    )
    assert forbidden_imports(module) == [
        "4: from serving.loadtest import main",
        "5: import train.model_afids, numpy",
        "9: import bench.bench_layer",
        "10: from tests import conftest",
    ]
