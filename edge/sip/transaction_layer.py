"""Transaction table: matches messages to the §17 machines and multiplexes their timers.

One earliest deadline for the whole table (`get_timer()`), kept in a heap with lazy deletion so a
proxy with thousands of live transactions pays O(log n) per timer change.
"""

from __future__ import annotations

import heapq

from edge.sip.events import (
    RequestReceived,
    ResponseReceived,
    TransactionEvent,
    TransactionKey,
    TransactionTerminated,
)
from edge.sip.message import Request, Response
from edge.sip.transaction import (
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    TimerConfig,
    Transaction,
    client_key,
    server_key,
)

ClientTransaction = InviteClientTransaction | NonInviteClientTransaction
ServerTransactionT = InviteServerTransaction | NonInviteServerTransaction


class TransactionLayer:
    def __init__(self, timers: TimerConfig | None = None, *, send_100_trying: bool = True) -> None:
        self.timers = timers or TimerConfig()
        self.send_100_trying = send_100_trying
        self.clients: dict[TransactionKey, ClientTransaction] = {}
        self.servers: dict[TransactionKey, ServerTransactionT] = {}
        self._heap: list[tuple[float, int, TransactionKey, bool]] = []
        self._scheduled: dict[tuple[TransactionKey, bool], float] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self.clients) + len(self.servers)

    # -- client side ----------------------------------------------------------------------
    def send_request(self, request: Request, now: float, *, reliable: bool) -> list[TransactionEvent]:
        """Start a client transaction; the request must carry its top Via with a fresh branch."""
        if request.method == "ACK":
            raise ValueError("ACK is sent outside client transactions (§17.1.1.3 / §13.2.2.4)")
        key = client_key(request)
        if key in self.clients:
            raise ValueError(f"duplicate client transaction {key}")
        txn: ClientTransaction
        if request.method == "INVITE":
            txn = InviteClientTransaction(key, request, reliable=reliable, timers=self.timers)
        else:
            txn = NonInviteClientTransaction(key, request, reliable=reliable, timers=self.timers)
        self.clients[key] = txn
        return self._after(txn, txn.start(now), client=True)

    def receive_response(self, response: Response, now: float) -> list[TransactionEvent]:
        key = client_key(response)
        txn = self.clients.get(key)
        if txn is None:
            return [ResponseReceived(None, response)]
        return self._after(txn, txn.receive_response(response, now), client=True)

    # -- server side ----------------------------------------------------------------------
    def receive_request(self, request: Request, now: float, *, reliable: bool) -> list[TransactionEvent]:
        key = server_key(request)
        txn = self.servers.get(key)
        if txn is not None:
            return self._after(txn, txn.receive_request(request, now), client=False)
        if request.method == "ACK":
            return [RequestReceived(None, request)]  # ACK for a 2xx: its own transaction-less path
        new: ServerTransactionT
        if request.method == "INVITE":
            new = InviteServerTransaction(key, request, reliable=reliable, timers=self.timers)
            events = new.start(now, send_100_trying=self.send_100_trying)
        else:
            new = NonInviteServerTransaction(key, request, reliable=reliable, timers=self.timers)
            events = new.start(now)
            if request.method == "CANCEL":
                target = TransactionKey(key.branch, key.sent_by, "INVITE")
                if target in self.servers:
                    events = [RequestReceived(key, request, cancelled=target)]
        self.servers[key] = new
        return self._after(new, events, client=False)

    def send_response(self, response: Response, now: float) -> list[TransactionEvent]:
        """Send through the server transaction the response's Via/CSeq identify."""
        via = response.top_via
        method = response.cseq.method
        txn: ServerTransactionT | None = None
        if via is not None and via.is_rfc3261:
            txn = self.servers.get(TransactionKey(via.branch or "", via.sent_by, method))
        if txn is None:
            txn = self._find_legacy(response)
        if txn is None:
            raise KeyError("no server transaction for response")
        return self._after(txn, txn.send_response(response, now), client=False)

    def _find_legacy(self, response: Response) -> ServerTransactionT | None:
        for txn in self.servers.values():
            r = txn.request
            if r.call_id == response.call_id and r.cseq == response.cseq and not txn.terminated:
                return txn
        return None

    def transport_error(self, key: TransactionKey, now: float) -> list[TransactionEvent]:
        txn: Transaction | None = self.clients.get(key) or self.servers.get(key)
        if txn is None:
            return []
        return self._after(txn, txn.transport_error(now), client=key in self.clients)

    # -- timers ---------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        heap = self._heap
        while heap:
            when, _, key, client = heap[0]
            if self._scheduled.get((key, client)) == when:
                return when
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key, client = heapq.heappop(heap)
            if self._scheduled.get((key, client)) != when:
                continue
            del self._scheduled[(key, client)]
            txn: Transaction | None = (self.clients if client else self.servers).get(key)
            if txn is not None:
                out += self._after(txn, txn.handle_timer(now), client=client)
        return out

    def _after(
        self, txn: Transaction, events: list[TransactionEvent], *, client: bool
    ) -> list[TransactionEvent]:
        slot = (txn.key, client)
        if txn.terminated:
            (self.clients if client else self.servers).pop(txn.key, None)
            self._scheduled.pop(slot, None)
            return events
        when = txn.get_timer()
        if when is None:
            self._scheduled.pop(slot, None)
        elif self._scheduled.get(slot) != when:
            self._scheduled[slot] = when
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, txn.key, client))
        return events


__all__ = ["TransactionLayer", "TransactionTerminated"]
