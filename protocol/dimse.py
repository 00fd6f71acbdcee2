"""DIMSE command sets (PS3.7 9.3, Annex E): decode the few elements of a command set that
the lean paths use (C-STORE-RQ/RSP, C-ECHO-RQ, C-CANCEL-RQ, C-GET-RSP), encode the
C-STORE-RQ, the C-GET-RQ and the responses we send without pynetdicom.

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).
"""
from __future__ import annotations

import struct

from stowage.protocol.status import SUCCESS

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_GET_RQ, C_GET_RSP, C_MOVE_RSP = 0x0010, 0x8010, 0x8021
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0001  # any other value would do (PS3.7 E.1); pynetdicom sends 0x0001

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")

# (0000,eeee) elements we read, and how
_UIDS = {0x0002: "affected_sop_class_uid", 0x1000: "affected_sop_instance_uid",
         0x1030: "move_originator_ae"}
_SHORTS = {0x0100: "command_field", 0x0110: "message_id", 0x0120: "responding_to", 0x0700: "priority",
           0x0800: "dataset_type", 0x0900: "status", 0x1031: "move_originator_message_id",
           0x1020: "remaining", 0x1021: "completed", 0x1022: "failed", 0x1023: "warning"}
_TEXTS = {0x0902: "error_comment"}


class CommandError(ValueError):
    """A command set that cannot be decoded."""


def decode(data: bytes | bytearray) -> dict[str, int | str]:
    """The elements of a command set that the lean path uses."""
    out: dict[str, int | str] = {}
    view, pos, end = memoryview(data), 0, len(data)
    while pos + 8 <= end:
        group, elem, length = _ELEMENT.unpack_from(view, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise CommandError(f"malformed command element ({group:04X},{elem:04X}) length {length}")
        if elem in _SHORTS and length == 2:
            out[_SHORTS[elem]] = _US.unpack_from(view, pos)[0]
        elif elem in _UIDS:
            out[_UIDS[elem]] = bytes(view[pos:pos + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        elif elem in _TEXTS:
            out[_TEXTS[elem]] = bytes(view[pos:pos + length]).decode("ascii", "replace").strip(" \x00")
        pos += length
    if pos != end:
        raise CommandError("command set ends inside an element header")
    if "command_field" not in out:
        raise CommandError("command set lacks Command Field")
    return out


def _el(elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _ae(title: str) -> bytes:
    raw = title.strip()[:16].encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _lo(text: str) -> bytes:
    raw = text[:64].encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _with_group_length(body: bytes) -> bytes:
    return _el(0x0000, _UL.pack(len(body))) + body


def store_request(message_id: int, sop_class: str, sop_instance: str, priority: int = 0,
                  originator: tuple[str, int] | None = None) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), announcing a dataset; `originator` is
    the Move Originator's (AE title, Message ID) for a C-MOVE sub-operation."""
    body = b"".join((
        _el(0x0002, _ui(sop_class)),
        _el(0x0100, _US.pack(C_STORE_RQ)),
        _el(0x0110, _US.pack(message_id & 0xFFFF)),
        _el(0x0700, _US.pack(priority)),
        _el(0x0800, _US.pack(DATASET_PRESENT)),
        _el(0x1000, _ui(sop_instance)),
        *((_el(0x1030, _ae(originator[0])), _el(0x1031, _US.pack(originator[1] & 0xFFFF)))
          if originator else ()),
    ))
    return _with_group_length(body)


def get_request(message_id: int, sop_class: str, priority: int = 0) -> bytes:
    """A C-GET-RQ command set (PS3.7 9.3.3.1); the identifier follows as its data set."""
    return _with_group_length(b"".join((
        _el(0x0002, _ui(sop_class)),
        _el(0x0100, _US.pack(C_GET_RQ)),
        _el(0x0110, _US.pack(message_id & 0xFFFF)),
        _el(0x0700, _US.pack(priority)),
        _el(0x0800, _US.pack(DATASET_PRESENT)),
    )))


def _response(command_field: int, message_id: int, sop_class: str, status: int, *rest: bytes) -> bytes:
    """A response command set without a data set: the elements every response has, then `rest`."""
    return _with_group_length(b"".join((
        _el(0x0002, _ui(sop_class)),
        _el(0x0100, _US.pack(command_field)),
        _el(0x0120, _US.pack(message_id)),
        _el(0x0800, _US.pack(NO_DATASET)),
        _el(0x0900, _US.pack(status)),
        *rest,
    )))


def store_response(message_id: int, sop_class: str, sop_instance: str, status: int,
                   comment: str = "") -> bytes:
    return _response(C_STORE_RSP, message_id, sop_class, status,
                     _el(0x0902, _lo(comment)) if comment else b"", _el(0x1000, _ui(sop_instance)))


def suboperations(n: int) -> int:
    """A sub-operation count as its US field can carry it: at most 65535. A retrieve of
    more instances (a patient's whole history) says 65535 until fewer remain, rather than
    failing to encode its response (which ended the C-MOVE or C-GET after one instance)."""
    return min(max(int(n), 0), 0xFFFF)


def retrieve_response(command_field: int, message_id: int, sop_class: str, status: int,
                      counts: tuple[int, int, int, int]) -> bytes:
    """A C-MOVE-RSP or C-GET-RSP without an identifier (PS3.7 9.3.3.2, 9.3.4.2):
    `counts` are the remaining, completed, failed and warning sub-operations."""
    return _response(command_field, message_id, sop_class, status,
                     *(_el(0x1020 + i, _US.pack(suboperations(n))) for i, n in enumerate(counts)))


def echo_response(message_id: int, sop_class: str) -> bytes:
    return _response(C_ECHO_RSP, message_id, sop_class, SUCCESS)
