"""Association establishment (PS3.8 7.1, PS3.7 Annex D): the names and User Information
items every association we request or accept carries. The A-ASSOCIATE-RQ/AC PDUs are
encoded and decoded with pynetdicom's PDU classes."""
from __future__ import annotations

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
