"""The append-only audit log: who commanded what, what the gateway did with it, and what it
told each device (``docs/security.md``).

:mod:`gateway.audit.trail` is the port the core and the uplinks record through,
:mod:`gateway.audit.log` the writer, :mod:`gateway.audit.files` the format, reading and
verification of the files.
"""

from gateway.audit.files import CURRENT, GENESIS, AuditLine, Verification, read_lines, verify
from gateway.audit.log import AuditLog
from gateway.audit.refusals import RefusalRecorder
from gateway.audit.trail import CORE_SOURCE, NO_AUDIT, AuditKind, AuditTrail, NullAuditTrail

__all__ = [
    "CORE_SOURCE",
    "CURRENT",
    "GENESIS",
    "NO_AUDIT",
    "AuditKind",
    "AuditLine",
    "AuditLog",
    "AuditTrail",
    "NullAuditTrail",
    "RefusalRecorder",
    "Verification",
    "read_lines",
    "verify",
]
