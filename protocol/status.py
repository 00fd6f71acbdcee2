"""DIMSE status codes (PS3.7 Annex C, and each service's table in PS3.4) that stowage
sends or acts on, named as the standard names them. Where the standard gives one value
two names (one per service), both are here: a reader of the C-FIND code sees the C-FIND
name.
"""
from __future__ import annotations

# General (PS3.7 C.1-C.5)
SUCCESS = 0x0000
CANCEL = 0xFE00                                  # terminated due to a Cancel request
PENDING = 0xFF00
PENDING_WARNING = 0xFF01                         # matches are continuing, optional keys not supported
PENDING_STATUSES = (PENDING, PENDING_WARNING)
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
SOP_CLASS_NOT_SUPPORTED = 0x0122                 # Refused
NO_SUCH_ACTION_TYPE = 0x0123
NOT_AUTHORIZED = 0x0124                          # Refused: Not Authorized (PS3.7 C.5.x)
RESOURCE_LIMITATION = 0x0213                     # Failure: not performed for a resource limit (PS3.7 C)

# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700                        # Refused
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900        # Error
CANNOT_UNDERSTAND = 0xC000                       # Error (C000-CFFF)
COERCION_OF_DATA_ELEMENTS = 0xB000               # Warning
ELEMENTS_DISCARDED = 0xB006                      # Warning
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001       # PS3.7 C.4 warning, as some peers answer a C-STORE
# The C-STORE-RSP statuses a sender counts as warnings (stored, with a remark).
STORE_WARNINGS = frozenset({OPTIONAL_ATTRIBUTES_NOT_SUPPORTED, COERCION_OF_DATA_ELEMENTS, ELEMENTS_DISCARDED,
                            DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING})
# dcm4chee-arc's status for "Subsequent occurrence of rejected object" (PS3.4 leaves the
# choice to us; this one keeps stowage and dcm4chee alike for senders and their logs).
SUBSEQUENT_OCCURRENCE_OF_REJECTED_OBJECT = 0xA771

# C-FIND, C-MOVE, C-GET (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000                       # Failed (C000-CFFF)
UNABLE_TO_CALCULATE_NUMBER_OF_MATCHES = 0xA701   # Refused: Out of Resources
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702         # Refused: Out of Resources
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000    # Warning: one or more failures or warnings
OUT_OF_RESOURCES_STATUSES = (OUT_OF_RESOURCES, UNABLE_TO_CALCULATE_NUMBER_OF_MATCHES,
                             UNABLE_TO_PERFORM_SUBOPERATIONS)

# Failure Reason (0008,1197) of a Storage Commitment result (PS3.3 C.14.1.1, PS3.4 J.3.3)
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
