"""Association establishment (PS3.8 7.1, PS3.7 Annex D): the names and User Information
items every association we request or accept carries. The A-ASSOCIATE-RQ/AC PDUs are
encoded and decoded with pynetdicom's PDU classes, except on the lean receive path: the
A-ASSOCIATE-RQ of a storage association is read, and its A-ASSOCIATE-AC written, here."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu_primitives import (ImplementationClassUIDNotification, ImplementationVersionNameNotification,
                                       MaximumLengthNotification)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # the DICOM Application Context (PS3.7 A.2.1)
def user_information(max_pdu: int, implementation_class_uid: str, implementation_version_name: str) -> list:
    """The User Information items every association request or acceptance carries (PS3.7 D.3.3)."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID(implementation_class_uid)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = implementation_version_name
    return [length, impl, version]


# --- the A-ASSOCIATE-RQ read and the A-ASSOCIATE-AC written without pynetdicom (PS3.8 9.3.2-9.3.3) ---
#
# pynetdicom builds a primitive, a PresentationContext and a validated pydicom UID for every
# proposed context: 22 ms of CPU for the 120-odd contexts DCMTK's storescu proposes, which a
# modality sending one instance per association pays each time. The lean path reads the
# fixed fields and the items with struct, and leaves anything unusual to pynetdicom.

_ITEM = struct.Struct(">BxH")                 # item type, reserved, item length
_FIXED = 68                                   # protocol version, reserved, called AE, calling AE, 32 reserved
APPLICATION_CONTEXT_ITEM, PRESENTATION_CONTEXT_RQ, PRESENTATION_CONTEXT_AC, USER_INFORMATION = 0x10, 0x20, 0x21, 0x50
ABSTRACT_SYNTAX, TRANSFER_SYNTAX = 0x30, 0x40
MAXIMUM_LENGTH, IMPLEMENTATION_CLASS_UID, ASYNCHRONOUS_OPERATIONS, IMPLEMENTATION_VERSION_NAME = 0x51, 0x52, 0x53, 0x55
# User Information sub-items the lean path answers itself (the others: role selection,
# extended negotiation, user identity, need pynetdicom).
PLAIN_USER_ITEMS = frozenset({MAXIMUM_LENGTH, IMPLEMENTATION_CLASS_UID, ASYNCHRONOUS_OPERATIONS,
                              IMPLEMENTATION_VERSION_NAME})


class Unusual(ValueError):
    """Something the lean reader leaves to pynetdicom's (a malformed item, or one it does not read)."""


@dataclass
class AssociateRequest:
    """The fields of an A-ASSOCIATE-RQ body that the lean receive path uses."""

    fixed: bytes                                       # the 68 bytes before the items
    application_context: str
    contexts: list[tuple[int, str, list[str]]]         # (context ID, abstract syntax, transfer syntaxes)
    user_items: dict[int, bytes]                       # User Information sub-item type -> value (the first)

    @property
    def called_ae(self) -> str:
        return self.fixed[4:20].decode("ascii", "replace").strip()

    @property
    def calling_ae(self) -> str:
        return self.fixed[20:36].decode("ascii", "replace").strip()

    @property
    def max_pdu(self) -> int:
        value = self.user_items.get(MAXIMUM_LENGTH, b"")
        return int.from_bytes(value, "big") if len(value) == 4 else 0


def _uid(value: bytes | memoryview) -> str:
    return bytes(value).rstrip(b"\0 ").decode("ascii")


def _items(body: memoryview, pos: int, end: int):
    """(type, value) of each item between pos and end; Unusual if one overruns."""
    while pos < end:
        if pos + 4 > end:
            raise Unusual("an item header is cut short")
        item_type, length = _ITEM.unpack_from(body, pos)
        if pos + 4 + length > end:
            raise Unusual(f"item 0x{item_type:02X} overruns its container")
        yield item_type, body[pos + 4:pos + 4 + length]
        pos += 4 + length


def parse_associate_rq(body: bytes | bytearray | memoryview) -> AssociateRequest:
    """The A-ASSOCIATE-RQ body (after the 6-byte PDU header); raises Unusual for anything
    the lean path does not read, which pynetdicom then reads (or refuses) instead."""
    view = memoryview(body)
    if len(view) < _FIXED:
        raise Unusual("shorter than the fixed fields")
    context, contexts, user = None, [], {}
    try:
        for item_type, value in _items(view, _FIXED, len(view)):
            if item_type == APPLICATION_CONTEXT_ITEM:
                context = _uid(value)
            elif item_type == PRESENTATION_CONTEXT_RQ:
                contexts.append(_presentation_context(value))
            elif item_type == USER_INFORMATION:
                for sub_type, sub_value in _items(value, 0, len(value)):
                    if sub_type not in PLAIN_USER_ITEMS:
                        raise Unusual(f"user information sub-item 0x{sub_type:02X}")
                    user.setdefault(sub_type, bytes(sub_value))
            else:
                raise Unusual(f"item 0x{item_type:02X}")
    except UnicodeDecodeError:
        raise Unusual("a UID that is not ASCII") from None
    if context is None or not contexts:
        raise Unusual("no application context or no presentation context")
    return AssociateRequest(bytes(view[:_FIXED]), context, contexts, user)


def _presentation_context(value: memoryview) -> tuple[int, str, list[str]]:
    if len(value) < 4:
        raise Unusual("a presentation context item is cut short")
    abstract, syntaxes = None, []
    for sub_type, sub_value in _items(value, 4, len(value)):
        if sub_type == ABSTRACT_SYNTAX and abstract is None:
            abstract = _uid(sub_value)
        elif sub_type == TRANSFER_SYNTAX:
            syntaxes.append(_uid(sub_value))
        else:
            raise Unusual(f"presentation context sub-item 0x{sub_type:02X}")
    if abstract is None or not syntaxes:
        raise Unusual("a presentation context without its abstract or transfer syntax")
    if not value[0] & 1:  # PS3.8 9.3.2.2: odd integers 1-255
        raise Unusual(f"presentation context ID {value[0]}")
    return value[0], abstract, syntaxes


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, len(value)) + value


def associate_ac(request: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int,
                 implementation_class_uid: str, implementation_version_name: str) -> bytes:
    """The A-ASSOCIATE-AC PDU answering `request`: `results` are (context ID, result,
    transfer syntax) in context ID order; the AE titles and reserved bytes are the
    request's (PS3.8 9.3.3.1), the User Information that of `user_information`."""
    items = [_item(APPLICATION_CONTEXT_ITEM, APPLICATION_CONTEXT_NAME.encode())]
    for context_id, result, syntax in results:
        items.append(_item(PRESENTATION_CONTEXT_AC, bytes((context_id, 0, result, 0))
                           + _item(TRANSFER_SYNTAX, syntax.encode())))
    user = (_item(MAXIMUM_LENGTH, max_pdu.to_bytes(4, "big"))
            + _item(IMPLEMENTATION_CLASS_UID, implementation_class_uid.encode())
            + _item(IMPLEMENTATION_VERSION_NAME, implementation_version_name.encode()))
    items.append(_item(USER_INFORMATION, user))
    body = b"\x00\x01\x00\x00" + request.fixed[4:] + b"".join(items)
    return struct.pack(">BxI", 0x02, len(body)) + body
