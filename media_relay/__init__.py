"""Media relay core (spec §7): sans-IO stream table, RTP stats, SDES/SRTP, SDP, uvloop adapter.

Modules: ``rtp`` (headers, RFC 3550 stats), ``table`` (``PortAllocator``, ``RelayTable``),
``events``, ``srtp`` (SDES, ``SrtpContext``, ``SrtpTranscoder``), ``sdp``, ``worker``
(``RelayWorker``, the only module that imports asyncio), ``fastpath`` (``FlowSync``: the table's
established flows mirrored into the optional native forwarder ``_fastpath.c``).
"""
