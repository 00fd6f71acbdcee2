"""The generated parts of docs/conformance.md, read from the code's own tables: the SOP
class CSV, pydicom's and pynetdicom's dictionaries, the worker's AE (every presentation
context it accepts), the Q/R key tables, the status constants and the Error Comments at
the places that return them, the configuration dataclasses.

The document's prose is written by hand; each generated part sits between
`<!-- begin generated: NAME -->` and `<!-- end generated: NAME -->`, and only those
parts are rewritten, so a change to the code shows up as a diff of the document.

    python ops/conformance.py            the document with its generated parts renewed, on stdout
    python ops/conformance.py --write    the same, written to docs/conformance.md
    python ops/conformance.py --check    exit 1 when docs/conformance.md is not current
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import importlib
import io
import re
import sys
from functools import cache
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conformance.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom._uid_dict import UID_dictionary  # noqa: E402

_SECTION = re.compile(r"(<!-- begin generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                      re.S)


def uid_name(uid: str) -> str:
    return UID_dictionary.get(uid, ("",) * 5)[0] or "(unnamed)"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@cache
def worker_ae():
    """The AE a worker builds from the embedded defaults: what every association negotiates against."""
    from stowage.engine.runtime.config import Config
    from stowage.workers.services import build_ae
    return build_ae(Config())


@cache
def config():
    from stowage.engine.runtime.config import Config
    return Config()


def _syntax_names(uids) -> str:
    return ", ".join(f"{uid_name(u)} ({u})" for u in uids)


# --- sections -------------------------------------------------------------------------

def services() -> str:
    from pynetdicom.sop_class import Verification as VERIFICATION
    from stowage.engine.store.commitment import SOP_CLASS as COMMITMENT
    from stowage.workers.contexts import storage_sop_classes
    from stowage.workers.find import FIND_SOP_CLASSES
    from stowage.workers.retrieve import GET_SOP_CLASSES, MOVE_SOP_CLASSES
    from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as STUDY_FIND,
                                      StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
                                      StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE)
    accepted = {str(c.abstract_syntax) for c in worker_ae().supported_contexts}
    scu = {VERIFICATION: "`stowage echo`", COMMITMENT: "`stowage send --commit`",
           STUDY_FIND: "`stowage migrate`: enumeration and IMAGE-level listings",
           STUDY_MOVE: "`stowage migrate --method move`", STUDY_GET: "`stowage migrate --method get`"}

    def row(label: str, uids, scu_use: str = "") -> list[str]:
        scp = "Yes" if set(uids) <= accepted else "No"
        return [label, f"Yes ({scu_use})" if scu_use else "No", scp]

    storage = storage_sop_classes()
    rows = [row(f"Verification ({VERIFICATION})", [VERIFICATION], scu[VERIFICATION]),
            row(f"Storage: {len(storage)} SOP classes (table in Storage SOP classes)", storage,
                "`stowage send`, C-MOVE and C-GET sub-operations; SCP by role selection for "
                "`stowage migrate --method get`"),
            row(f"{uid_name(COMMITMENT)} ({COMMITMENT})", [COMMITMENT], scu[COMMITMENT])]
    rows += [row(f"{uid_name(u)} ({u})", [u], scu.get(u, ""))
             for u in (*FIND_SOP_CLASSES, *MOVE_SOP_CLASSES, *GET_SOP_CLASSES)]
    return table(["SOP class", "user of service (SCU)", "provider of service (SCP)"], rows)


def implementation() -> str:
    """Read from each path that identifies stowage, so a path that drifts shows here."""
    from pydicom.filereader import _read_file_meta_info
    from stowage.engine.store import filemeta
    from stowage.engine.transfer.requestor import new_ae
    from stowage.protocol import identity
    meta = _read_file_meta_info(io.BytesIO(filemeta.file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                                                              "1.2.840.10008.1.2.1")))
    file_uid, file_name = meta.ImplementationClassUID, meta.ImplementationVersionName
    ae, requestor = worker_ae(), new_ae("STOWAGE")
    rows = [["SCP: every association `stowage serve` accepts (lean storage path and pynetdicom path)",
             str(ae.implementation_class_uid), ae.implementation_version_name, "`workers/services.build_ae`"],
            ["SCU: C-STORE from `stowage send`, C-MOVE sub-operations, C-GET from `stowage migrate --method get`, "
             "`stowage bench` (`protocol/store_scu.py`)",
             str(identity.IMPLEMENTATION_CLASS_UID), identity.IMPLEMENTATION_VERSION_NAME, "`protocol/identity.py`"],
            ["SCU: `stowage echo`, storage commitment requests and reports on a new association, the C-FIND and "
             "C-MOVE of `stowage migrate` (`engine/transfer/requestor.new_ae`)",
             str(requestor.implementation_class_uid), requestor.implementation_version_name,
             "`engine/transfer/requestor.new_ae`"],
            ["Part-10 files written by `stowage export`, and the file meta of every stored record "
             "((0002,0012), (0002,0013))", str(file_uid), str(file_name), "`engine/store/filemeta.py`"]]
    return table(["where", "Implementation Class UID", "Implementation Version Name", "set by"], rows)


def association_limits() -> str:
    from stowage.protocol.pdu import A_ABORT_INVALID_PDU, A_ABORT_UNEXPECTED_PDU, A_ASSOCIATE_RJ_LIMIT
    c = config()
    result = {1: "rejected-permanent", 2: "rejected-transient"}
    source = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
    rj_reason = {(3, 1): "temporary-congestion", (3, 2): "local-limit-exceeded"}
    abort_source = {0: "service-user", 2: "service-provider"}
    abort_reason = {0: "not specified", 2: "unexpected PDU", 6: "invalid PDU parameter value"}
    rj = A_ASSOCIATE_RJ_LIMIT
    rows = [["maximum open associations (`max_associations`)", str(c.max_associations)],
            ["beyond it: A-ASSOCIATE-RJ", f"{result[rj[7]]}, {source[rj[8]]}, {rj_reason[(rj[8], rj[9])]}"],
            ["maximum PDU length we receive (`max_pdu`, bytes)", str(c.max_pdu)],
            ["ARTIM / association request and release timeout (`acse_timeout`, s)", str(c.acse_timeout)],
            ["DIMSE message timeout (`dimse_timeout`, s)", str(c.dimse_timeout)],
            ["silence mid-PDU before disconnecting (`network_timeout`, s)", str(c.network_timeout)]]
    for name, pdu in (("malformed PDU", A_ABORT_INVALID_PDU), ("PDU unexpected in this state", A_ABORT_UNEXPECTED_PDU)):
        rows.append([f"A-ABORT on a {name}", f"source {abort_source[pdu[8]]}, reason {abort_reason[pdu[9]]}"])
    return table(["parameter", "value (embedded default)"], rows)


def accepted_contexts() -> str:
    from stowage.workers.contexts import storage_sop_classes
    from stowage.workers.find import _SUPPORTED
    storage = set(storage_sop_classes())

    def kind(uid: str) -> str:
        return "storage" if uid in storage else uid_name(uid).rpartition(" - ")[2]

    groups: dict[tuple, list[str]] = {}
    for cx in worker_ae().supported_contexts:
        uid = str(cx.abstract_syntax)
        key = (kind(uid), tuple(map(str, cx.transfer_syntax)), bool(cx.scu_role), bool(cx.scp_role))
        groups.setdefault(key, []).append(uid)
    ext = [n for n, on in zip(("relational queries", "combined date-time matching", "fuzzy semantic PN matching",
                                "timezone query adjustment"), _SUPPORTED) if on]
    rows = []
    for (service, syntaxes, scu, scp), uids in groups.items():
        if service == "storage":
            what = f"Storage: the {len(uids)} SOP classes of the Storage SOP classes table"
        else:
            what = "<br>".join(f"{uid_name(u)} ({u})" for u in uids)
        role = "SCP; also SCU when the requester asks by role selection (C-GET)" if scu and scp else "SCP"
        names = f"all {len(syntaxes)} of the Transfer syntaxes table" if len(syntaxes) > 6 else _syntax_names(syntaxes)
        neg = "; ".join(ext) + " (when asked for)" if service == "FIND" else "none"
        rows.append([what, names, role, neg])
    return table(["abstract syntax", "transfer syntaxes, in our order of preference",
                  "role", "extended negotiation"], rows)


def transfer_syntaxes() -> str:
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from stowage.engine.store import archive
    from stowage.engine.transfer import convert
    from stowage.workers.contexts import transfer_syntaxes as accepted
    saving = round((1 - archive._INCOMPRESSIBLE) * 100)
    targets = " or ".join(uid_name(u) for u in convert.TARGETS)
    rows = []
    for uid in accepted():
        stored = (f"byte-shuffled, zstd (raw when that saves under {saving} %)" if uid in archive.NATIVE_SYNTAXES
                  else "as received, not compressed again")
        if uid in convert.TARGETS:
            sending = "as stored, or converted to the other"
        elif convert.convertible(uid):
            sending = f"as stored; else to {targets}" + ("" if uid == DeflatedExplicitVRLittleEndian
                                                          else " if a decoder for it is installed")
        else:
            sending = "as stored only"
        rows.append([uid, uid_name(uid), stored, sending])
    return table(["UID", "name", "stored", "sent (C-MOVE, C-GET, `send`) when the peer does not accept it"], rows)


def storage_classes() -> str:
    from pynetdicom import sop_class
    from stowage.workers.contexts import storage_sop_classes
    with (ROOT / "workers" / "storage_sop_classes.csv").open() as f:
        target = {r["sop_class_uid"]: r for r in csv.DictReader(f)}
    pynd = set(sop_class._STORAGE_CLASSES.values())
    rows = []
    for uid in storage_sop_classes():
        entry = UID_dictionary.get(uid, ("",) * 5)
        name = (target.get(uid) or {}).get("name") or entry[0] or "(unnamed)"
        retired = "yes" if (target.get(uid) or {}).get("retired") == "yes" or entry[3] == "Retired" else ""
        listed = [s for s, on in (("target", uid in target), ("pydicom", bool(entry[0])), ("pynetdicom", uid in pynd)) if on]
        rows.append([uid, name, retired, ", ".join(listed)])
    return table(["SOP Class UID", "name", "retired", "listed by"], rows)


def proposed_contexts() -> str:
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as STUDY_FIND,
                                      StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
                                      StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE)
    from stowage.engine.transfer import commit_scu
    from stowage.engine.migrate import pull
    from stowage.engine.store.commitment import SOP_CLASS as COMMITMENT
    from stowage.engine.transfer.contexts import FALLBACKS, MAX_CONTEXTS
    from stowage.workers import commitment
    fallbacks = " and ".join(uid_name(u) for u in FALLBACKS)
    rows = [["every storage SOP class among the instances sent",
             f"each transfer syntax the instances are stored in, then {fallbacks}, one context per syntax "
             f"(at most {MAX_CONTEXTS} contexts per association; more go on further associations)", "SCU"],
            [f"{uid_name(COMMITMENT)} (`stowage send --commit`)", _syntax_names(commit_scu._SYNTAXES), "SCU"],
            [f"{uid_name(COMMITMENT)} (report on a new association)", _syntax_names(commitment.SYNTAXES),
             "SCP, by role selection"],
            ["Verification (`stowage echo`)", "pynetdicom's default proposal: " + _syntax_names(_echo_syntaxes()), "SCU"],
            [f"{uid_name(STUDY_FIND)} and {uid_name(STUDY_MOVE)} (`stowage migrate`)",
             "pynetdicom's default proposal: " + _syntax_names(_echo_syntaxes()), "SCU"],
            [f"{uid_name(STUDY_GET)} (`stowage migrate --method get`)", _syntax_names([ImplicitVRLittleEndian]), "SCU"],
            ["every storage SOP class the study's IMAGE-level listing names (or "
             f"{len(pull.COMMON_CLASSES)} common ones when the source lists none), with `stowage migrate --method get`",
             f"one context per syntax, uncompressed first, as many per class as {pull.MAX_CONTEXTS - 1} contexts allow; "
             "with more classes, one context per class proposing every syntax", "SCP, by role selection"]]
    return table(["abstract syntax", "transfer syntaxes proposed", "role"], rows)


def _echo_syntaxes() -> list[str]:
    from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
    return [str(u) for u in DEFAULT_TRANSFER_SYNTAXES]


def scu_store_status() -> str:
    from stowage.protocol.status import STORE_WARNINGS
    warnings = ", ".join(f"0x{v:04X}" for v in sorted(STORE_WARNINGS))
    return table(["C-STORE-RSP status", "counted as"],
                 [["0x0000", "completed"], [warnings, "warning"], ["any other", "failed"]])


def qr_keys() -> str:
    from stowage.catalog.keys import models
    rows = []
    for m in models().values():
        for level in m.levels:
            keys = m.keys[level].values()
            required = ", ".join(f"{k.keyword} ({k.type})" for k in keys if k.type in "RU")
            optional = ", ".join(k.keyword for k in keys if k.type == "O")
            rows.append([m.name, level, required, optional])
    return table(["model", "level", "required (R) and unique (U) keys", "optional keys (O); any other attribute too"], rows)


def matching() -> str:
    from stowage.catalog import matching as mt
    rows = [["universal (zero length or `*`)", "every key"],
            ["single value", "every key (PN component group by group)"],
            ["wildcard (`*`, `?`)", ", ".join(sorted(mt.WILDCARD_VRS))],
            ["range (`a-b`, `-b`, `a-`; date and time combined)", ", ".join(sorted(mt.RANGE_VRS))],
            ["list of values (backslash)", "UIDs, and any other key: any one value matches"],
            ["numeric comparison of single values", ", ".join(sorted(mt.NUMERIC_VRS))],
            ["sequence matching (one item of keys)", "SQ"]]
    return table(["matching type (PS3.4 C.2.2.2)", "VRs / keys"], rows)


def charsets() -> str:
    from pydicom.charset import python_encoding
    terms = sorted(t for t in python_encoding if t)
    single = [t for t in terms if not t.startswith("ISO 2022") and t not in ("ISO_IR 192", "GB18030", "GBK")]
    rows = [["single-byte without code extensions", ", ".join(f"`{t}`" for t in single) + " (and none: default repertoire)"],
            ["with code extensions (ISO 2022)", ", ".join(f"`{t}`" for t in terms if t.startswith("ISO 2022"))],
            ["multi-byte without code extensions", ", ".join(f"`{t}`" for t in ("ISO_IR 192", "GB18030", "GBK") if t in terms)]]
    return table(["kind", "Specific Character Set (0008,0005) terms decoded"], rows)


def commitment_timing() -> str:
    from stowage.engine.store import commitment as core
    from stowage.workers import commitment as w
    rows = [["first retry of a report that could not be delivered (s)", f"{w._BACKOFF_FIRST_S:g}"],
            ["retries double up to (s)", f"{w._BACKOFF_MAX_S:g}"],
            ["a report undelivered this long moves to `commitment/undeliverable/` (days)", f"{core.MAX_AGE_S / 86400:g}"],
            ["every worker scans the queue for reports nobody holds every (s)", f"{w._SCAN_INTERVAL_S:g}"],
            ["wait for the requester's N-EVENT-REPORT-RSP (s)", f"{w._RESPONSE_WAIT_S:g}"],
            ["reports delivered at once per worker", str(w._DELIVERY_THREADS)]]
    return table(["parameter", "value"], rows)


def configuration() -> str:
    from stowage.cli.serve import serve
    from stowage.engine.runtime.config import Config, Remote
    flags = {opt for param in serve.params for opt in param.opts}
    rows = []
    for f in dataclasses.fields(Config):
        flag = f"--{f.name.replace('_', '-')}"
        rows.append([f"`{f.name}`", f"`{_default(f)}`", f"`STOWAGE_{f.name.upper()}`",
                     f"`{flag}`" if flag in flags else ""])
    remote = ", ".join(f"`{f.name}` (`{_default(f)}`)" for f in dataclasses.fields(Remote) if f.name != "ae_title")
    return (table(["key", "default", "environment", "`stowage serve` flag"], rows)
            + f"\n\n`[remotes.<AE title>]` tables name the other AEs: {remote}.")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return str(value) if not isinstance(value, str) else repr(value)


# --- statuses: the constants and the Error Comments at the places that return them -----

_STATUS_FILES = {"store-status": ["engine/store/archive.py", "engine/receive/store.py", "engine/receive/ingest.py"],
                 "find-status": ["catalog/query.py", "workers/find.py"],
                 "retrieve-status": ["workers/retrieve.py"],
                 "commitment-status": ["workers/commitment.py", "engine/store/commitment.py"]}


def _module_of(path: str):
    return importlib.import_module("stowage." + path[:-3].replace("/", "."))


def _imported_statuses(tree: ast.Module) -> Iterator[tuple[str, int, str]]:
    """(name, value, inline comment) of the statuses a module imports from
    protocol/status.py, where every status code is defined."""
    names = {alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
             and node.module == "stowage.protocol.status" for alias in node.names}
    text = (ROOT / "protocol/status.py").read_text()
    for const, value, note in _hex_constants(text):
        if const in names:
            yield const, value, note


def _hex_constants(text: str) -> Iterator[tuple[str, int, str]]:
    """(name, value, inline comment) of module-level constants written as 4-digit hex."""
    tree = ast.parse(text)
    lines = text.splitlines()
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                 else [(target, value)])
        comment = lines[node.lineno - 1].partition("#")[2].strip()
        for t, v in pairs:
            src = ast.get_source_segment(text, v) or ""
            if isinstance(t, ast.Name) and re.fullmatch(r"0x[0-9A-Fa-f]{4}", src):
                yield t.id, int(src, 16), comment


def _expr(node: ast.AST) -> str:
    """A placeholder's expression, shortened for a reader: str(x), x[:40], type(e).__name__ → x, e."""
    if isinstance(node, ast.Call) and node.args:
        return _expr(node.args[0])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _expr(node.func.value)
    if isinstance(node, ast.Subscript):
        return _expr(node.value)
    if isinstance(node, ast.BoolOp):
        return _expr(node.values[0])
    if isinstance(node, ast.Attribute) and node.attr == "__name__":
        return f"type of {_expr(node.value)}"
    if isinstance(node, ast.Attribute):
        return _expr(node.value) if node.attr.startswith("_") else f"{_expr(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "…"


def _constant(node: ast.AST, path: str, module) -> object:
    """The value of a module-level constant that `node` names (`X`, `mod.X`), else None."""
    if not isinstance(node, (ast.Name, ast.Attribute)):
        return None
    name = node.id if isinstance(node, ast.Name) else node.attr
    if not name.isupper() or name.startswith("_"):
        return None
    try:
        return eval(compile(ast.Expression(node), path, "eval"), vars(module))  # a constant's name only
    except Exception:
        return None


def _comment(node: ast.AST | None, path: str, module) -> str:
    """An Error Comment as the code words it: placeholders as <expression>, or as the value
    of the string constant they name."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else ""
    if isinstance(node, ast.JoinedStr):
        return "".join(str(p.value) if isinstance(p, ast.Constant) else _placeholder(p.value, path, module)
                       for p in node.values)
    return _placeholder(node, path, module) if node is not None else ""


def _placeholder(node: ast.AST, path: str, module) -> str:
    value = _constant(node, path, module)
    return value if isinstance(value, str) else f"<{_expr(node)}>"


def _status_sites(path: str, tree: ast.Module, text: str) -> Iterator[tuple[str, int, str]]:
    """(constant name, value, Error Comment) at each call `f(STATUS, "comment")` or
    `f(STATUS, …, comment="…")` and each `return STATUS, "comment"`."""
    module = _module_of(path)

    def status_of(node: ast.AST) -> tuple[str, int] | None:
        value = _constant(node, path, module)
        if isinstance(value, int) and 0 <= value <= 0xFFFF:
            return (node.id if isinstance(node, ast.Name) else node.attr), value
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            found = status_of(node.args[0])
            if not found:
                continue
            text_node = next((k.value for k in node.keywords if k.arg == "comment"), None)
            if text_node is None and len(node.args) > 1 and isinstance(node.args[1], (ast.Constant, ast.JoinedStr, ast.Name)):
                text_node = node.args[1]
            if text_node is not None:
                yield *found, _comment(text_node, path, module)
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and len(node.value.elts) == 2:
            found = status_of(node.value.elts[0])
            if found and isinstance(node.value.elts[1], (ast.Constant, ast.JoinedStr)):
                yield *found, _comment(node.value.elts[1], path, module)


def _words(constant: str) -> str:
    text = constant.replace("_", " ").lower().capitalize()
    return re.sub(r"\b(sop|uid)\b", lambda m: m[1].upper(), text, flags=re.I)


def statuses(name: str) -> str:
    from stowage.protocol.status import PENDING
    by_value: dict[int, dict] = {}
    for path in _STATUS_FILES[name]:
        text = (ROOT / path).read_text()
        tree = ast.parse(text)
        for const, value, note in (*_imported_statuses(tree), *_hex_constants(text)):
            entry = by_value.setdefault(value, {"names": {}, "comments": [], "where": set()})
            entry["names"].setdefault(const, note)
        for const, value, comment in _status_sites(path, tree, text):
            entry = by_value.setdefault(value, {"names": {}, "comments": [], "where": set()})
            entry["names"].setdefault(const, "")
            if comment and comment not in entry["comments"] and value < PENDING:  # pending carries none
                entry["comments"].append(comment)
            entry["where"].add(f"`{path}`")
    rows = []
    for value in sorted(by_value, key=lambda v: (v != 0, v)):
        entry = by_value[value]
        meaning = "; ".join(dict.fromkeys(_words(n) + (f" ({c})" if c else "")
                                          for n, c in entry["names"].items()))
        comments = "<br>".join(f"“{c}”" for c in entry["comments"]) or "—"
        rows.append([f"0x{value:04X}", meaning, comments])
    return table(["status", "meaning (the code's constant)", "Error Comment / reason as the code words it"], rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "services": services,
    "implementation": implementation,
    "association-limits": association_limits,
    "accepted-contexts": accepted_contexts,
    "transfer-syntaxes": transfer_syntaxes,
    "proposed-contexts": proposed_contexts,
    "scu-store-status": scu_store_status,
    "storage-classes": storage_classes,
    "store-status": lambda: statuses("store-status"),
    "find-status": lambda: statuses("find-status"),
    "retrieve-status": lambda: statuses("retrieve-status"),
    "commitment-status": lambda: statuses("commitment-status"),
    "commitment-timing": commitment_timing,
    "qr-keys": qr_keys,
    "matching": matching,
    "charsets": charsets,
    "configuration": configuration,
}


def render(document: str) -> str:
    """`document` with every generated part rewritten from the code as it is now."""
    seen = set()

    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in SECTIONS:
            raise SystemExit(f"docs/conformance.md names an unknown generated part {name!r}")
        seen.add(name)
        return m.group(1) + SECTIONS[name]().rstrip() + "\n" + m.group(4)

    out = _SECTION.sub(fill, document)
    missing = set(SECTIONS) - seen
    if missing:
        raise SystemExit(f"docs/conformance.md lacks the generated parts {sorted(missing)}")
    return out


def main(argv: list[str]) -> int:
    current = DOC.read_text()
    fresh = render(current)
    if "--check" in argv:
        if fresh != current:
            print("docs/conformance.md is not current: python ops/conformance.py --write", file=sys.stderr)
            return 1
        return 0
    if "--write" in argv:
        DOC.write_text(fresh)
    else:
        sys.stdout.write(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
