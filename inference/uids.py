"""UIDs that identify radgate itself in the DICOM it writes.

radgate has no UID root of its own; it uses pydicom's, which pydicom offers for
exactly this (`pydicom.uid.generate_uid`). The constant below is
``generate_uid(entropy_srcs=["radgate implementation class"])``, fixed here so that it
never changes with a pydicom upgrade.
"""

from __future__ import annotations

from pydicom.uid import UID

# (0002,0012) Implementation Class UID of the files radgate writes.
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.26067953165391626652214162024398307224")
# (0002,0013) Implementation Version Name: SH, at most 16 characters.
IMPLEMENTATION_VERSION_NAME = "RADGATE_0_1"
