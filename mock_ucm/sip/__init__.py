"""The mock Unified CM's SIP side: registrar, B2BUA call control and the echo test number.

Sans-IO cores (`registrar`, `calls`, `echo`, `core`) and one thin asyncio adapter (`service`).
"""

from mock_ucm.sip.core import LocalNode, UcmSipCore
from mock_ucm.sip.events import OutgoingRequest, OutgoingResponse, SipOutput, Target
from mock_ucm.sip.registrar import Binding, Registrar

__all__ = [
    "Binding",
    "LocalNode",
    "OutgoingRequest",
    "OutgoingResponse",
    "Registrar",
    "SipOutput",
    "Target",
    "UcmSipCore",
]
