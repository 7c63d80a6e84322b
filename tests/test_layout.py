"""The package's layout keeps its promises: imports follow the layers, and bmsd
imports none of the clone's tools."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_daemon_imports_none_of_the_tools() -> None:
    code = ("import json, sys, bmsd.cli, bmsd.ingest.daemon;"
            " print(json.dumps(sorted(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = json.loads(run.stdout)
    assert "bmsd.ingest.daemon" in loaded
    assert [m for m in loaded if m.split(".")[0] in ("tools", "tests", "bench")] == []


#: Who may import whom, by layer, top down: a module imports from its own layer
#: or the layers below it, never from one above. Shared types live in neutral homes
#: at the bottom (bmsd/models.py, bmsd/batch.py, bmsd/database.py, ...), so no
#: import runs back up: ingest may import alerts and schema, never the reverse.
LAYERS = [
    {"bmsd.__main__", "bmsd.cli"},
    {"bmsd.ingest", "bmsd.simulate"},
    {"bmsd.alerts", "bmsd.schema", "bmsd.sparkplug"},
    {"bmsd.batch", "bmsd.database", "bmsd.config_load"},
    {"bmsd.config", "bmsd.config_text"},
    {"bmsd.streams", "bmsd.models", "bmsd.metrics", "bmsd.errors", "bmsd.logs",
     "bmsd.resources", "bmsd.internals", "bmsd"},
]


def _layer(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for n, layer in enumerate(LAYERS):
            if prefix in layer:
                return n
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def _imports() -> dict[str, set[str]]:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found: dict[str, set[str]] = {}
    for path in sorted((root / "bmsd").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        names = found.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
    return {m: {n for n in names if n == "bmsd" or n.startswith("bmsd.")}
            for m, names in found.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_every_import_follows_the_layers() -> None:
    wrong = []
    for module, imported in _imports().items():
        for name in imported:
            if _layer(name) < _layer(module):
                wrong.append(f"{module} imports {name}")
    assert sorted(wrong) == []


def test_no_two_packages_nor_two_modules_import_each_other() -> None:
    imports = _imports()
    edges = {(_package(m), _package(n)) for m, names in imports.items() for n in names
             if _package(m) != _package(n)}
    assert sorted((a, b) for a, b in edges if (b, a) in edges) == []
    pairs = {(m, n) for m, names in imports.items() for n in names}
    assert sorted((a, b) for a, b in pairs if (b, a) in pairs and a < b) == []


def test_no_function_class_or_module_of_bmsd_is_too_long_to_read_at_once() -> None:
    import ast
    from pathlib import Path

    limits = {"function": 60, "class": 250, "module": 400}
    over = []
    for path in sorted((Path(__file__).resolve().parent.parent / "bmsd").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > limits["module"]:
            over.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            kind = ("function" if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    else "class" if isinstance(node, ast.ClassDef) else None)
            if kind and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > limits[kind]:
                    over.append(f"{path.name}:{node.name}: {length} lines")
    assert over == []
