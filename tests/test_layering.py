"""Dependencies point one way: server -> batching -> memory, sequences -> llama_cpp (memory and sequences
never import each other; memory imports nothing of parallama but itself).

Every module under parallama/ is parsed (ast) and its imports resolved, including relative imports,
imports inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import parallama

PACKAGE_DIR = Path(parallama.__file__).parent
MODULES = sorted(PACKAGE_DIR.rglob("*.py"))
HTTP_LIBRARIES = ("fastapi", "starlette", "uvicorn")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, name: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module ``source`` imports (``from a import b`` gives a and a.b)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def file_imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def refers_to(imported: str, target: str) -> bool:
    return imported == target or imported.startswith(target + ".")


def violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in MODULES:
        name = module_name(path)
        if not refers_to(name, f"parallama.{layer}"):
            continue
        for imported in file_imports(path):
            if any(refers_to(imported, f) for f in forbidden):
                bad.append(f"{path.relative_to(PACKAGE_DIR.parent)} imports {imported}")
    return bad


def test_the_walk_sees_every_layer_and_real_imports():
    names = {module_name(p) for p in MODULES}
    for layer in ("sequences", "memory", "batching", "server"):
        assert any(refers_to(n, f"parallama.{layer}") for n in names), layer
    # the walk must see real arrows, or the rules below would pass on nothing
    backend = PACKAGE_DIR / "sequences" / "llama_backend.py"
    assert "llama_cpp" in imports_of(backend.read_text(), module_name(backend))
    scheduler = PACKAGE_DIR / "batching" / "scheduler.py"
    assert any(refers_to(i, "parallama.sequences") for i in imports_of(scheduler.read_text(), module_name(scheduler)))


def test_relative_imports_are_resolved():
    assert imports_of("from ..server import app", "parallama.batching.engine") >= {"parallama.server"}
    assert imports_of("from . import scheduler", "parallama.batching.engine") >= {"parallama.batching.scheduler"}
    assert imports_of("from .x import y", "parallama.batching", is_package=True) >= {"parallama.batching.x"}
    assert imports_of("def f():\n    import llama_cpp\n", "parallama.batching.x") == {"llama_cpp"}


def test_sequences_imports_neither_batching_nor_server():
    assert violations("sequences", ("parallama.batching", "parallama.server", *HTTP_LIBRARIES)) == []


def test_memory_imports_no_other_layer_and_no_llama_cpp():
    assert violations("memory", ("parallama.batching", "parallama.server", "parallama.sequences", "llama_cpp",
                                 *HTTP_LIBRARIES)) == []


def test_batching_imports_neither_server_nor_http_nor_llama_cpp():
    assert violations("batching", ("parallama.server", "llama_cpp", *HTTP_LIBRARIES)) == []


def test_only_the_sequences_layer_imports_llama_cpp():
    outside = [p for p in MODULES if not refers_to(module_name(p), "parallama.sequences")]
    assert outside
    bad = [str(p.relative_to(PACKAGE_DIR.parent)) for p in outside
           if any(refers_to(i, "llama_cpp") for i in file_imports(p))]
    assert bad == []


@pytest.mark.parametrize("package, absent", [
    ("parallama.batching", ("llama_cpp", "fastapi", "parallama.server")),
    ("parallama.sequences", ("fastapi", "parallama.batching", "parallama.server", "parallama.memory")),
    ("parallama.memory", ("llama_cpp", "fastapi", "parallama.batching", "parallama.server", "parallama.sequences")),
])
def test_importing_a_layer_loads_nothing_above_or_beside_it(package, absent):
    """The transitive check: what Python really loads, not only what one file names."""
    code = f"import sys, {package}; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert package in loaded
    assert [m for m in loaded if any(refers_to(m, a) for a in absent)] == []
