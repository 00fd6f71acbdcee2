"""The DICOM protocol layers every side of stowage speaks (acceptor, lean ingest, lean
SCU, C-GET writer, bench client), one module per layer in the standard's words:
`pdu` (PS3.8 upper layer PDUs and framing), `acse` (association establishment items),
`dimse` (PS3.7 command sets), `status` (DIMSE status codes), `store_scu` (a lean Storage
SCU association), `sockopts` (socket options), and `pynetdicom_patches` (every change we
make inside pynetdicom). It imports nothing from the rest of stowage."""
