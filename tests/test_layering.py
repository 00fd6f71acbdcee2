"""The protocol layer stays one layer (issue #13): stowage.protocol imports nothing of the
archive; every other module takes PDUs, DIMSE command fields and status codes from it
and defines none of its own; and only protocol/pynetdicom_patches/ changes anything
inside pynetdicom. Read from the sources, so a new module is checked without a list."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "protocol" / "pynetdicom_patches"  # a package: a module per patch family
# Code outside the protocol layer; tests build broken PDUs on purpose and are not checked.
OUTSIDE = ("engine", "workers", "catalog", "bench", "ops", "stowage")


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@functools.cache
def _text(path: Path) -> str:
    return path.read_text()


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(_text(path), str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


@functools.cache
def _lines(path: Path) -> list[bytes]:
    return [line.encode() for line in _text(path).split("\n")]


def _hex(path: Path, node: ast.AST) -> str | None:
    """The source of an int literal written in hex, else None (sliced from the file's
    lines: ast.get_source_segment splits the whole file again at every call)."""
    if isinstance(node, ast.Constant) and type(node.value) is int and node.lineno == node.end_lineno:
        text = _lines(path)[node.lineno - 1][node.col_offset:node.end_col_offset].decode()
        return text if text.lower().startswith("0x") else None
    return None


def _protocol_names() -> set[str]:
    """Public names the protocol layer defines, and its modules' names (also the old ones)."""
    names = {p.stem for p in _sources("protocol")} | {"commands", "reactor", "store_responses",
                                                        "pending", "sockopts", "store_scu"}
    for path in _sources("protocol"):
        for node in _tree(path).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    names.discard("__init__")
    return {n for n in names if not n.startswith("_") and n not in {"log"}}


def _status_values() -> set[int]:
    from stowage.protocol import status
    return {v for k, v in vars(status).items() if k.isupper() and type(v) is int}


def test_the_protocol_layer_imports_nothing_of_the_archive():
    offenders = []
    for path in _sources("protocol"):
        for node in ast.walk(_tree(path)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{_where(path, node)} imports {m}" for m in modules
                          if m.startswith("stowage.") and not m.startswith("stowage.protocol")]
    assert not offenders, offenders


def test_protocol_names_come_from_the_protocol_layer_only():
    """No module imports a PDU, DIMSE or status name (or a protocol module) from engine,
    workers, catalog or bench: bench and workers do not reach into engine for them."""
    names, offenders = _protocol_names(), []
    for path in _sources(*OUTSIDE):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stowage.") \
                    and not node.module.startswith("stowage.protocol"):
                wrong = sorted(a.name for a in node.names if a.name in names)
                if wrong:
                    offenders.append(f"{_where(path, node)}: {', '.join(wrong)} from {node.module}")
    assert not offenders, offenders


def test_no_status_code_is_defined_outside_the_protocol_layer():
    """A constant (an upper-case name) holding a DIMSE status written in hex, or any
    literal that can only be a status (0xA700-0xCFFF, 0xFE00, 0xFF00, 0xFF01), outside
    protocol/ is a second definition of what protocol/status.py names."""
    statuses, offenders = _status_values(), []
    only_status = re.compile(r"0x(A[0-9A-F]{3}|B[0-9A-F]{3}|C[0-9A-F]{3}|FE00|FF00|FF01)$", re.I)
    for path in _sources(*OUTSIDE):
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.lstrip("_").isupper()
                                                    for t in node.targets):
                for n in ast.walk(node.value):
                    text = _hex(path, n)
                    if text and len(text) == 6 and n.value in statuses:
                        offenders.append(f"{_where(path, node)}: {ast.unparse(node.targets[0])} = {text}")
            text = _hex(path, node)
            if text and only_status.match(text):
                offenders.append(f"{_where(path, node)}: literal status {text}")
    assert not offenders, sorted(set(offenders))


def test_no_pdu_is_framed_outside_the_protocol_layer():
    """PDU and PDV headers (`>BxI`, `>IBB`) and fixed PDUs written as bytes belong to
    protocol/pdu.py."""
    offenders = []
    for path in _sources(*OUTSIDE):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Constant) and node.value in (">BxI", ">IBB"):
                offenders.append(f"{_where(path, node)}: struct {node.value!r}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, bytes) and len(node.value) >= 6 \
                    and 0x01 <= node.value[0] <= 0x07 and node.value[1] == 0:
                offenders.append(f"{_where(path, node)}: PDU bytes {node.value[:6]!r}…")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "bytes" \
                    and node.args and isinstance(node.args[0], (ast.List, ast.Tuple)) \
                    and len(node.args[0].elts) >= 6 and _hex(path, node.args[0].elts[0]) \
                    and 0x01 <= node.args[0].elts[0].value <= 0x07:
                offenders.append(f"{_where(path, node)}: PDU bytes([{_hex(path, node.args[0].elts[0])}, …])")
    assert not offenders, offenders


def _pynetdicom_names(tree: ast.Module) -> set[str]:
    """Names a module binds to pynetdicom's modules, classes and functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("pynetdicom")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pynetdicom"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_only_the_patch_module_changes_pynetdicom():
    """No assignment, `setattr` or `del` on an attribute of something imported from
    pynetdicom, and no `__class__` swap, outside protocol/pynetdicom_patches/."""
    offenders = []
    for path in _sources(*OUTSIDE, "protocol"):
        if path.parent == PATCHES:
            continue
        tree = _tree(path)
        ours = _pynetdicom_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") \
                    and node.args and _root(node.args[0]) in ours:
                offenders.append(f"{_where(path, node)}: {node.func.id}({ast.unparse(node.args[0])}, …)")
            for t in targets:
                if isinstance(t, ast.Attribute) and (_root(t) in ours or t.attr == "__class__"):
                    offenders.append(f"{_where(path, node)}: {ast.unparse(t)} = …")
    assert not offenders, offenders


def test_the_patch_module_guards_the_version_once():
    text = _text(PATCHES / "__init__.py")
    assert text.count("pynetdicom.__version__ !=") == 1
    assert len(re.findall(r"^def install\(", text, re.M)) == 1
    others = [p for p in _sources(*OUTSIDE, "protocol") if p != PATCHES / "__init__.py" and "__version__" in _text(p)
              and "pynetdicom" in _text(p)]
    assert not others, others


# The layers, top first (issue #18): a module imports from its own unit or from a layer
# below, never from above, and never from a sibling unit of its own layer.
LAYERS = (
    ("stowage.__main__",),
    ("stowage.cli",),
    ("stowage.bench",),
    ("stowage.workers", "stowage.engine.acceptor"),
    ("stowage.engine.metrics",),
    ("stowage.engine.web",),  # a door, like workers/: its dashboard reads what migrate and import record
    ("stowage.engine.migrate", "stowage.engine.importer", "stowage.engine.forward", "stowage.engine.iceberg"),
    ("stowage.engine.receive", "stowage.engine.transfer", "stowage.engine.lifecycle"),
    ("stowage.engine.deidentify",),
    ("stowage.engine.storage",),  # sealed segments on object storage: read under every reader, uploaded by serve
    ("stowage.engine.store",),
    ("stowage.engine.runtime",),
    ("stowage.catalog",),
    ("stowage.protocol",),
)
PACKAGES = ("stowage", "engine", "workers", "catalog", "bench", "protocol")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts[0] == "stowage" else "stowage." + ".".join(parts)


def _unit(module: str) -> tuple[int, str] | None:
    """(layer, unit) of a module: the longest LAYERS prefix it falls under."""
    best = None
    for rank, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (rank, unit)
    return best


@functools.cache
def _import_graph() -> dict[str, set[str]]:
    """Every stowage module and the stowage modules it imports, at the top or in a function."""
    modules = {_module_name(p): p for p in _sources(*PACKAGES)}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stowage"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("stowage")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_every_module_has_a_layer():
    missing = [m for m in _import_graph() if _unit(m) is None and m not in ("stowage", "stowage.engine")]
    assert not missing, f"add these to LAYERS: {missing}"


def test_every_import_points_down():
    """engine/ never imports workers/ or the command line; the store never imports the
    lifecycle above it (the quota policy); bench/ never imports the command line."""
    offenders = []
    for module, imports in _import_graph().items():
        mine = _unit(module)
        for target in imports:
            theirs = _unit(target)
            if mine is None or theirs is None or theirs[1] == mine[1]:
                continue
            if theirs[0] <= mine[0]:
                offenders.append(f"{module} imports {target} ({'above' if theirs[0] < mine[0] else 'beside'} it)")
    assert not offenders, sorted(offenders)


def test_no_import_cycle():
    """No two modules import each other, directly or around a loop (Tarjan's strongly
    connected components, iteratively)."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    loops.append(sorted(component))
    assert not loops, loops
