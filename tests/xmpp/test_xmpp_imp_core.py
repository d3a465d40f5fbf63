"""ImpCore without sockets: in-memory clients, a fake clock, RFC 6121 routing rules."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

from edge.xmpp.events import StanzaReceived
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.stanza import stream_header
from mock_ucm.imp import CloseRequested, DataQueued, ImpCore, ImpOutput, TlsUpgradeRequested

DOMAIN = "example.com"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class Harness:
    """Several in-memory clients of one core; outputs are parsed per connection."""

    def __init__(self, users: tuple[str, ...] = ("alice", "bob", "carol"), **kwargs: int) -> None:
        self.core = ImpCore(
            DOMAIN,
            authenticate_plain=lambda u, p: p == "pw",
            validate_token=lambda u, t: False,
            users=list(users),
            **kwargs,
        )
        self.framers: dict[int, XmlStreamFramer] = {}
        self.inbox: dict[int, list[ET.Element]] = {}
        self.closed: set[int] = set()
        self.tls: set[int] = set()

    def _take(self, outputs: list[ImpOutput]) -> None:
        for out in outputs:
            if isinstance(out, DataQueued):
                for event in self.framers[out.conn_id].receive_data(out.data):
                    if isinstance(event, StanzaReceived):
                        self.inbox[out.conn_id].append(event.element)
            elif isinstance(out, CloseRequested):
                self.closed.add(out.conn_id)
            elif isinstance(out, TlsUpgradeRequested):
                self.tls.add(out.conn_id)

    def connect(self, conn: int, secure: bool = True) -> None:
        self.framers[conn] = XmlStreamFramer()
        self.inbox[conn] = []
        self._take(self.core.connection_made(conn, secure=secure, now=NOW))

    def send(self, conn: int, data: str | bytes, now: float = NOW) -> list[ET.Element]:
        """Feed the core; return (and clear) the stanzas that connection received."""
        self._take(self.core.data_received(conn, data.encode() if isinstance(data, str) else data, now))
        got, self.inbox[conn] = self.inbox[conn], []
        return got

    def take(self, conn: int) -> list[ET.Element]:
        got, self.inbox[conn] = self.inbox[conn], []
        return got

    def restart_parser(self, conn: int) -> None:
        self.framers[conn].reset()

    def login(self, conn: int, user: str, resource: str, presence: bool = True) -> None:
        self.connect(conn)
        self.send(conn, stream_header(DOMAIN, None, None))
        auth = base64.b64encode(f"\0{user}\0pw".encode()).decode()
        (success,) = self.send(
            conn, f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        )
        assert success.tag.endswith("success")
        self.restart_parser(conn)
        self.send(conn, stream_header(DOMAIN, None, None))
        bind = (
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        (bound,) = self.send(conn, bind)
        assert bound.get("type") == "result", ET.tostring(bound)
        if presence:
            self.send(conn, "<presence/>")


def bodies(stanzas: list[ET.Element]) -> list[str | None]:
    return [s.findtext("{jabber:client}body") for s in stanzas if s.tag == "{jabber:client}message"]


def test_starttls_requested_then_stream_restarts() -> None:
    h = Harness()
    h.connect(1, secure=False)
    h.send(1, stream_header(DOMAIN, None, None))
    (proceed,) = h.send(1, "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert proceed.tag == "{urn:ietf:params:xml:ns:xmpp-tls}proceed"
    assert h.tls == {1}
    assert h.send(1, b"\x16\x03\x01 ClientHello bytes") == []  # ignored while TLS is negotiated
    h._take(h.core.tls_established(1, NOW))
    h.restart_parser(1)
    (feats,) = h.send(1, stream_header(DOMAIN, None, None))
    assert feats.find("{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms") is not None


def test_offline_message_has_deterministic_delay_stamp() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    h.send(1, "<message to='bob@example.com' type='chat'><body>later</body></message>", now=NOW)
    assert h.core.status()["offline_stored"] == 1
    h.login(2, "bob", "b", presence=False)
    got = h.send(2, "<presence/>", now=NOW + 3600)
    (msg,) = [s for s in got if s.tag == "{jabber:client}message"]
    delay = msg.find("{urn:xmpp:delay}delay")
    assert delay is not None and delay.get("stamp") == "2023-11-14T22:13:20Z"
    assert msg.get("from") == "alice@example.com/a"


def test_offline_storage_is_bounded_per_user() -> None:
    h = Harness(max_offline_per_user=2)
    h.login(1, "alice", "a")
    for i in range(2):
        assert h.send(1, f"<message to='bob@example.com' id='m{i}'><body>{i}</body></message>") == []
    (bounce,) = h.send(1, "<message to='bob@example.com' id='m2'><body>2</body></message>")
    assert bounce.get("type") == "error" and bounce.get("id") == "m2"
    assert bounce.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None


def test_bare_jid_message_goes_to_highest_priority_resource() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    h.login(2, "bob", "low")
    h.login(3, "bob", "high")
    h.send(3, "<presence><priority>10</priority></presence>")
    h.send(2, "<presence><priority>1</priority></presence>")
    h.take(2), h.take(3)
    h.send(1, "<message to='bob@example.com'><body>to best</body></message>")
    assert (bodies(h.take(2)), bodies(h.take(3))) == ([], ["to best"])
    h.send(1, "<message to='bob@example.com/low'><body>to low</body></message>")
    assert bodies(h.take(2)) == ["to low"]
    # Unknown resource falls back to the bare JID rules (RFC 6121 §8.5.3.2.1).
    h.send(1, "<message to='bob@example.com/gone'><body>fallback</body></message>")
    assert bodies(h.take(3)) == ["fallback"]


def test_presence_broadcast_probe_and_unavailable_on_disconnect() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    h.login(2, "bob", "b", presence=False)
    probe_answers = h.send(2, "<presence><show>away</show></presence>")
    assert [(p.get("from"), p.findtext("{jabber:client}show")) for p in probe_answers] == [
        ("alice@example.com/a", None)
    ]
    (seen,) = h.take(1)
    assert (seen.get("from"), seen.get("to"), seen.findtext("{jabber:client}show")) == (
        "bob@example.com/b",
        "alice@example.com/a",
        "away",
    )
    h._take(h.core.connection_lost(2, NOW))
    (gone,) = h.take(1)
    assert (gone.get("type"), gone.get("from")) == ("unavailable", "bob@example.com/b")
    assert h.core.status()["sessions_current"] == 1


def test_directed_presence_and_subscription_delivery() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    h.login(2, "bob", "b")
    h.take(1), h.take(2)
    h.send(1, "<presence to='bob@example.com/b'><status>psst</status></presence>")
    (directed,) = h.take(2)
    assert directed.findtext("{jabber:client}status") == "psst"
    h.send(1, "<presence type='subscribe' to='bob@example.com'/>")
    (request,) = [s for s in h.take(2) if s.tag == "{jabber:client}presence"]
    assert (request.get("type"), request.get("from")) == ("subscribe", "alice@example.com")


def test_roster_set_push_and_remove() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    (roster,) = h.send(1, "<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>")
    items = {i.get("jid"): i.get("subscription") for i in roster.iter("{jabber:iq:roster}item")}
    assert items == {"bob@example.com": "both", "carol@example.com": "both"}
    got = h.send(
        1,
        "<iq type='set' id='s'><query xmlns='jabber:iq:roster'>"
        "<item jid='bob@example.com' name='Bobby'><group>Friends</group></item></query></iq>",
    )
    result = [s for s in got if s.get("id") == "s"]
    pushes = [s for s in got if s.get("type") == "set"]
    assert result[0].get("type") == "result"
    (item,) = pushes[0].iter("{jabber:iq:roster}item")
    assert (item.get("name"), item.findtext("{jabber:iq:roster}group"), item.get("subscription")) == (
        "Bobby",
        "Friends",
        "both",
    )
    got = h.send(
        1,
        "<iq type='set' id='d'><query xmlns='jabber:iq:roster'>"
        "<item jid='bob@example.com' subscription='remove'/></query></iq>",
    )
    assert [i.get("subscription") for s in got for i in s.iter("{jabber:iq:roster}item")] == ["remove"]
    # Subscriptions are cancelled both ways: no presence flows between them any more.
    h.login(2, "bob", "b")
    assert h.take(1) == []
    (bob_roster,) = h.send(2, "<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>")
    items = {i.get("jid"): i.get("subscription") for i in bob_roster.iter("{jabber:iq:roster}item")}
    assert items == {"alice@example.com": "none", "carol@example.com": "both"}


def test_ping_and_unknown_iq() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    (pong,) = h.send(1, "<iq type='get' id='p' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (pong.get("type"), pong.get("from")) == ("result", "example.com")
    (err,) = h.send(1, "<iq type='get' id='v'><vCard xmlns='vcard-temp'/></iq>")
    assert err.get("type") == "error"
    assert err.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None
    (err,) = h.send(1, "<iq type='get' id='o' to='bob@example.com/none'><query xmlns='x'/></iq>")
    assert err.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None


def test_framer_error_becomes_stream_error_for_that_connection_only() -> None:
    h = Harness(max_stanza_bytes=1024)
    h.login(1, "alice", "a")
    h.login(2, "bob", "b")
    h.take(1), h.take(2)
    got = h.send(2, "<message><body>" + "x" * 2000)
    assert got[0].tag == "{http://etherx.jabber.org/streams}error"
    assert got[0][0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}policy-violation"
    assert h.closed == {2}
    (gone,) = h.take(1)
    assert gone.get("type") == "unavailable"
    assert h.send(2, "<presence/>") == []
    h.login(3, "carol", "c")
    h.send(3, "<message to='alice@example.com'><body>fine</body></message>")
    assert bodies(h.take(1)) == ["fine"]
    assert h.core.status()["stream_errors"] == 1


def test_client_close_is_answered_and_presence_withdrawn() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    h.login(2, "bob", "b")
    h.take(1)
    h._take(h.core.data_received(2, b"</stream:stream>", NOW))
    assert h.closed == {2}
    (gone,) = h.take(1)
    assert gone.get("type") == "unavailable"


def test_shutdown_sends_system_shutdown() -> None:
    h = Harness()
    h.login(1, "alice", "a")
    h._take(h.core.shutdown())
    (err,) = h.take(1)
    assert err[0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}system-shutdown"
    assert h.closed == {1}
