"""Who stowage says it is (PS3.7 D.3.3.2): one Implementation Class UID and Version Name
on every association it accepts or requests, through every path, and in every file it
writes (PS3.10 7.1, (0002,0012) and (0002,0013))."""
from __future__ import annotations

import uuid

from stowage import __version__

# stowage's one identity, on every association it accepts or requests (the library's and
# the lean paths alike) and in every file it writes. The class UID is derived from a fixed
# UUID under the 2.25 root (PS3.5 B.2), which needs no registration; the version name
# (at most 16 characters, PS3.7 D.3.3.2.2) follows the package version.
_IMPLEMENTATION_UUID = uuid.UUID("52594de3-3d54-4dd3-9d2b-6744fe1a57ad")
IMPLEMENTATION_CLASS_UID = f"2.25.{_IMPLEMENTATION_UUID.int}"
IMPLEMENTATION_VERSION_NAME = f"STOWAGE_{__version__}"[:16]


def identify(ae):
    """`ae` (an Application Entity) with stowage's Implementation Class UID and Version Name."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
