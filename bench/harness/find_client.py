"""A minimal C-FIND SCU for timing: one association, blocking socket reads, no polling.

pynetdicom as the SCU polls its reactor with millisecond sleeps and handles one PDU per
loop, so a C-FIND with many matches is timed at pynetdicom's pace per response
(docs/benchmarks.md) whatever the SCP does. This client speaks the Upper Layer directly (PDUs built with pynetdicom's
classes, command sets with pydicom) and reads with plain blocking `recv`, so what it
times is the SCP.
"""
from __future__ import annotations

import socket
import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext

from stowage.protocol import dimse
from stowage.protocol.acse import APPLICATION_CONTEXT_NAME
from stowage.protocol.pdu import (A_ASSOCIATE_AC, A_RELEASE_RQ_PDU, COMMAND, HEADER as _PDU, LAST, P_DATA_TF,
                                  PDV_HEADER as _PDV)
from stowage.protocol.status import PENDING_STATUSES

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
MAX_PDU = 1 << 20


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _command(sop_class: str, message_id: int) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = dimse.C_FIND_RQ
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = dimse.DATASET_PRESENT
    body = _encode(cmd)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body  # (0000,0000) group length, implicit VR


class FindClient:
    """One association to an SCP for one FIND SOP class; `find()` returns (status, matches)."""

    def __init__(self, host: str, port: int, called_ae: str, sop_class: str, calling_ae: str = "BENCHSCU",
                 timeout: float = 300.0) -> None:
        self.sop_class = sop_class
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._message_id = 0
        rq = A_ASSOCIATE()
        rq.application_context_name = APPLICATION_CONTEXT_NAME
        rq.calling_ae_title, rq.called_ae_title = calling_ae, called_ae
        cx = PresentationContext()
        cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 1, sop_class, [IMPLICIT_VR_LE]
        rq.presentation_context_definition_list = [cx]
        length = MaximumLengthNotification()
        length.maximum_length_received = MAX_PDU
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = "1.2.826.0.1.3680043.10.1138.99"
        rq.user_information = [length, impl]
        self.sock.sendall(self._encode_rq(rq))
        pdu_type, body = self._read_pdu()
        if pdu_type != A_ASSOCIATE_AC:
            raise ConnectionError(f"association not accepted (PDU type 0x{pdu_type:02X})")
        self.peer_max = self._peer_max(body)

    @staticmethod
    def _encode_rq(rq: A_ASSOCIATE) -> bytes:
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(rq)
        return pdu.encode()

    @staticmethod
    def _peer_max(body: bytes) -> int:
        """The maximum PDU length in the A-ASSOCIATE-AC's user information (0: unlimited)."""
        pos = 68  # fixed fields of the AC
        while pos + 4 <= len(body):
            item, length = body[pos], struct.unpack(">H", body[pos + 2:pos + 4])[0]
            if item == 0x50:  # user information: sub-items
                sub = pos + 4
                while sub + 4 <= pos + 4 + length:
                    kind, sl = body[sub], struct.unpack(">H", body[sub + 2:sub + 4])[0]
                    if kind == 0x51:
                        return struct.unpack(">I", body[sub + 4:sub + 8])[0]
                    sub += 4 + sl
            pos += 4 + length
        return 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            # Acknowledge at once: a peer that leaves Nagle on (DCMTK, hence Orthanc, unless
            # TCP_NODELAY is set in its environment) would otherwise wait out our delayed ACK.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("peer closed the connection")
            buf += chunk
        return bytes(buf)

    def _read_pdu(self) -> tuple[int, bytes]:
        pdu_type, length = _PDU.unpack(self._recv(6))
        return pdu_type, self._recv(length)

    def _send_pdvs(self, pdvs: list[tuple[int, bytes]]) -> None:
        limit = (self.peer_max or MAX_PDU) - 6 - 6
        out = []
        for control, data in pdvs:
            chunks = [data[i:i + limit] for i in range(0, len(data), limit)] or [b""]
            for n, chunk in enumerate(chunks):
                last = LAST if n == len(chunks) - 1 else 0
                pdv = _PDV.pack(len(chunk) + 2, 1, (control & COMMAND) | last) + chunk
                out.append(_PDU.pack(P_DATA_TF, len(pdv)) + pdv)
        self.sock.sendall(b"".join(out))

    def find(self, identifier: Dataset) -> tuple[int, int]:
        """(final status, number of pending responses) of one C-FIND."""
        self._message_id += 1
        self._send_pdvs([(COMMAND, _command(self.sop_class, self._message_id)), (0, _encode(identifier))])
        matches = 0
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type != P_DATA_TF:
                raise ConnectionError(f"unexpected PDU type 0x{pdu_type:02X} during C-FIND")
            pos = 0
            while pos < len(body):
                length, _cx, control = _PDV.unpack_from(body, pos)
                data = body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if not control & COMMAND:
                    continue  # a data set fragment: only counted, through its command
                command += data
                if control & LAST:  # the command is complete
                    status = int(read_dataset(BytesIO(bytes(command)), True, True).Status)
                    command = bytearray()
                    if status in PENDING_STATUSES:
                        matches += 1
                    else:
                        return status, matches

    def close(self) -> None:
        try:
            self.sock.sendall(A_RELEASE_RQ_PDU)
            self._read_pdu()
        except OSError:
            pass
        finally:
            self.sock.close()
