"""Tidy: the layer boundaries and banned calls of ARCHITECTURE §2 and STYLE rule 2.

Method: parse every module under conveyor/ with ``ast`` (no imports executed) and
check (1) which conveyor packages it imports, (2) that storage/ and broker/ read
time, randomness and files only through what is passed in, (3) that sans-IO
codec modules import no I/O library, (4) that no FIXME is left behind.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "conveyor"
MODULES = sorted(ROOT.rglob("*.py"))

# (importing package prefix, forbidden imported prefixes)
FORBIDDEN_IMPORTS: list[tuple[str, tuple[str, ...]]] = [
    ("conveyor.storage", ("conveyor.broker", "conveyor.protocols", "conveyor.server",
                          "conveyor.client", "conveyor.cli")),
    ("conveyor.broker", ("conveyor.protocols", "conveyor.server", "conveyor.client",
                         "conveyor.cli")),
    ("conveyor.protocols", ("conveyor.storage", "conveyor.server", "conveyor.cli")),
    ("conveyor.client", ("conveyor.storage", "conveyor.broker", "conveyor.server",
                         "conveyor.protocols")),
]

BANNED_CALLS = {
    "time.time", "time.time_ns", "time.monotonic", "time.monotonic_ns", "time.sleep",
    "time.perf_counter", "asyncio.sleep", "datetime.now", "datetime.datetime.now",
    "datetime.utcnow", "random.random", "random.randint", "random.choice", "random.shuffle",
    "random.randrange", "random.uniform", "random.getrandbits", "os.urandom",
}
# The listener contract is the one server module a protocol may import.
ALLOWED_IMPORTS = {"conveyor.server.listeners"}
CLOCK_FREE_PACKAGES = ("conveyor.storage", "conveyor.broker")
# Modules allowed to touch the real file system / real time: the OS seam itself.
CLOCK_FREE_EXEMPT = {"conveyor.storage.fs"}

SANS_IO_SUFFIXES = ("codec", "framing", "frames", "messages", "machine", "encoders")
IO_MODULES = ("asyncio", "socket", "selectors", "uvloop", "aiohttp", "ssl")


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, name: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: -node.level] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def parsed() -> list[tuple[str, Path, ast.Module]]:
    return [(module_name(path), path, ast.parse(path.read_text(), str(path))) for path in MODULES]


def test_modules_found() -> None:
    assert len(MODULES) > 10


@pytest.mark.parametrize(("owner", "forbidden"), FORBIDDEN_IMPORTS)
def test_layer_boundaries(owner: str, forbidden: tuple[str, ...]) -> None:
    violations = []
    for name, path, tree in parsed():
        if not (name == owner or name.startswith(owner + ".")):
            continue
        for imported in imported_modules(tree, name):
            if imported.rsplit(".", 1)[0] in ALLOWED_IMPORTS or imported in ALLOWED_IMPORTS:
                continue
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                violations.append(f"{path.relative_to(ROOT.parent)} imports {imported}")
    assert violations == []


def test_no_protocol_imports_another() -> None:
    violations = []
    for name, path, tree in parsed():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] != "protocols":
            continue
        own = ".".join(parts[:3])
        for imported in imported_modules(tree, name):
            if imported.startswith("conveyor.protocols.") and not (
                imported == own or imported.startswith(own + ".")
            ):
                violations.append(f"{path.relative_to(ROOT.parent)} imports {imported}")
    assert violations == []


def test_storage_and_broker_read_time_and_randomness_only_through_arguments() -> None:
    violations = []
    for name, path, tree in parsed():
        if not name.startswith(CLOCK_FREE_PACKAGES) or name in CLOCK_FREE_EXEMPT:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = dotted(node.func)
            if called in BANNED_CALLS or called == "open":
                violations.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} calls {called}")
    assert violations == []


def test_sans_io_codecs_import_no_io() -> None:
    violations = []
    for name, path, tree in parsed():
        if ".protocols." not in name or not name.rsplit(".", 1)[-1].endswith(SANS_IO_SUFFIXES):
            continue
        for imported in imported_modules(tree, name):
            if imported.split(".")[0] in IO_MODULES:
                violations.append(f"{path.relative_to(ROOT.parent)} imports {imported}")
    assert violations == []


def test_no_fixme_left_behind() -> None:
    marker = "FIX" + "ME"
    offenders = [str(path) for path in MODULES if marker in path.read_text()]
    assert offenders == []
