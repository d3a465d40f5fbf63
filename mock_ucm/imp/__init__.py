"""The lab's mock Cisco IM&P XMPP server (spec §6): a sans-IO core and an asyncio adapter."""

from mock_ucm.imp.core import ImpCore
from mock_ucm.imp.events import CloseRequested, DataQueued, ImpOutput, TlsUpgradeRequested
from mock_ucm.imp.server import ImpServer, Listener

__all__ = [
    "CloseRequested",
    "DataQueued",
    "ImpCore",
    "ImpOutput",
    "ImpServer",
    "Listener",
    "TlsUpgradeRequested",
]
