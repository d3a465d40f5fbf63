"""RFC 4475 SIP torture messages: valid ones parse (and round-trip byte-exact), invalid ones raise
SipParseError with the RFC's answer. Messages re-typed from RFC 4475 §3.1-3.3."""

from __future__ import annotations

# ruff: noqa: E501  (wire-format fixtures are kept one header per line)
import pytest

from edge.sip import NameAddr, Request, Response, SipParseError, parse_message


def msg(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def sdp(ip: str) -> bytes:
    return (
        "v=0\r\n"
        f"o=mhandley 29739 7272939 IN IP4 {ip}\r\n"
        "s=-\r\n"
        f"c=IN IP4 {ip}\r\n"
        "t=0 0\r\n"
        "m=audio 49217 RTP/AVP 0 12\r\n"
        "m=video 3227 RTP/AVP 31\r\n"
        "a=rtpmap:31 LPC\r\n"
    ).encode()


WSINV = msg(
    "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0",
    "TO :",
    " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
    'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>',
    "  ;",
    "  tag = 98asjd8",
    "MaX-fOrWaRdS: 0068",
    "Call-ID: wsinv.ndaksdj@192.0.2.1",
    "Content-Length   : 150",
    "cseq: 0009",
    "  INVITE",
    "Via  : SIP  /   2.0",
    " /UDP",
    "    192.0.2.2;branch=390skdjuw",
    "s :",
    "NewFangledHeader:   newfangled value",
    " continued newfangled value",
    "UnknownHeaderWithUnusualValue: ;;,,;;,;",
    "Content-Type: application/sdp",
    "Route:",
    " <sip:services.example.com;lr;unknownwith=value;unknown-no-value>",
    "v:  SIP  / 2.0  / TCP     spindle.example.com   ;",
    "  branch  =   z9hG4bK9ikj8  ,",
    " SIP  /    2.0   / UDP  192.168.255.111   ; branch=",
    " z9hG4bK30239",
    'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =',
    "      newvalue ;",
    "  secondparam ; q = 0.33",
    body=sdp("192.0.2.3"),
)

INTMETH = msg(
    "!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    ":&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0",
    "Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~",
    'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:1_unusual.URI~(to-be!sure)&isn\'t+it$/crazy?,/;;*@example.com>',
    "From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>"
    ";fromParam''~+*_!.-%=\"работающий\";tag=_token~1'+`*%!-.",
    "Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
    "CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~",
    "Max-Forwards: 255",
    "extensionHeader-!.%*+_`'~:大停電",
    "Content-Length: 0",
)

ESC01 = msg(
    "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0",
    "To: sip:%75se%72@example.com",
    "From: <sip:I%20have%20spaces@example.net>;tag=938",
    "Max-Forwards: 87",
    "i: esc01.239409asdfakjkn23onasd0-3234",
    "CSeq: 234234 INVITE",
    "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw",
    "C: application/sdp",
    "Contact:",
    "  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>",
    "Content-Length: 150",
    body=sdp("192.0.2.1"),
)

ESCNULL = msg(
    "REGISTER sip:example.com SIP/2.0",
    "To: sip:null-%00-null@example.com",
    "From: sip:null-%00-null@example.com;tag=839923423",
    "Max-Forwards: 70",
    "Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd",
    "CSeq: 14398234 REGISTER",
    "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw",
    "Contact: <sip:%00@host5.example.com>",
    "Contact: <sip:%00%00@host5.example.com>",
    "L:0",
)

ESC02 = msg(
    "RE%47IST%45R sip:registrar.example.com SIP/2.0",
    'To: "%Z%45" <sip:resource@example.com>',
    'From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23',
    "Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf",
    "Via: SIP/2.0/TCP host.example.com;branch=z9hG4bK209%fzsnel234",
    "CSeq: 29344 RE%47IST%45R",
    "Max-Forwards: 70",
    "Contact: <sip:alias1@host1.example.com>",
    "C%6Fntact: <sip:alias2@host2.example.com>",
    "Contact: <sip:alias3@host3.example.com>",
    "l: 0",
)

LWSDISP = msg(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: caller<sip:caller@example.com>;tag=323",
    "Max-Forwards: 70",
    "Call-ID: lwsdisp.1234abcd@funky.example.com",
    "CSeq: 60 OPTIONS",
    "Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw",
    "l: 0",
)

_LONG = "long" * 60
LONGREQ = msg(
    "INVITE sip:user@example.com SIP/2.0",
    f'To: "I have a user name of {"extreme" * 10} proportion"<sip:user@example.com:6000'
    f";unknownparam1=very{_LONG}value;{'name' * 30}=shortvalue;very{_LONG}ParameterNameWithNoValue>",
    f"F: sip:{'amazinglylongcallername' * 5}@example.net;tag={'12982' * 40}424;{'unknownheaderparam' * 5}",
    f"Call-ID: longreq.{'onereallyreallyreallyreallylongcallid' * 20}",
    "CSeq: 3882340 INVITE",
    *[f"Via: SIP/2.0/TCP sip{i}.example.com;branch=z9hG4bK{i}{'x' * 30}" for i in range(40)],
    "Max-Forwards: 70",
    f"Contact: <sip:{'amazinglylongcallername' * 5}@host5.example.net>",
    "Content-Type: application/sdp",
    f"{'x' * 200}-Header: {'value' * 300}",
    "l: 150",
    body=sdp("192.0.2.1"),
)

DBLREQ = msg(
    "REGISTER sip:example.com SIP/2.0",
    "To: sip:j.user@example.com",
    "From: sip:j.user@example.com;tag=43251j3j324",
    "Max-Forwards: 8",
    "I: dblreq.0ha0isndaksdj99sdfafnl3lk233412",
    "Contact: sip:j.user@host.example.com",
    "CSeq: 8 REGISTER",
    "Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492",
    "Content-Length: 0",
) + msg(
    "INVITE sip:joe@example.com SIP/2.0",
    "t: sip:joe@example.com",
    "From: sip:caller@example.net;tag=141334",
    "Max-Forwards: 8",
    "Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234",
    "Content-Type: application/sdp",
    "Content-Length: 150",
    body=sdp("192.0.2.1"),
)

SEMIURI = msg(
    "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0",
    "To: sip:j_user@example.com",
    "From: sip:caller@example.org;tag=33242",
    "Max-Forwards: 3",
    "Call-ID: semiuri.0ha0isndaksdj",
    "CSeq: 8 OPTIONS",
    "Accept: application/sdp, application/pkcs7-mime,",
    "        multipart/mixed, multipart/signed,",
    "        message/sip, message/sipfrag",
    "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw",
    "l: 0",
)

TRANSPORTS = msg(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:user@example.com",
    "From: <sip:caller@example.com>;tag=323",
    "Max-Forwards: 70",
    "Call-ID:  transports.kijh4akdnaqjkwendsasfdj",
    "Accept: application/sdp",
    "CSeq: 60 OPTIONS",
    "Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw",
    "Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf",
    "Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj",
    "Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en",
    "Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee",
    "l: 0",
)

MPART_BODY = (
    b"--boundary42\r\nContent-Type: application/sdp\r\n\r\n"
    + sdp("192.0.2.1")
    + b"\r\n--boundary42\r\nContent-Type: application/octet-stream\r\n\r\n"
    + bytes(range(256))
    + b"\r\n\r\n\r\n--boundary42--\r\n"
)
MPART01 = msg(
    "MESSAGE sip:kumiko@example.org SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport",
    "Max-Forwards: 70",
    "Route: <sip:127.0.0.1:5080>",
    "Identity: r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuLIK0YWVKZhKv9Mj8UeXqkMVbnVq37CD+813gvYjcBUaZngQmXc9WNZSDNGCzA+fWl9MEUHWIZo1CeJebdY/XlgKeTa0Olvq0rt70Q5jiSfbqMJmQFteeivUhkMWYUA=",
    "Contact: <sip:fluffy@127.0.0.1:5070>",
    "To: <sip:kumiko@example.org>",
    "From: <sip:fluffy@example.com>;tag=2fb0dcc9",
    "Call-ID: 3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..",
    "CSeq: 1 MESSAGE",
    "Content-Transfer-Encoding: binary",
    'Content-Type: multipart/mixed;boundary="boundary42"',
    f"Content-Length: {len(MPART_BODY)}",
    body=MPART_BODY,
)

UNREASON = msg(
    "SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - простое",
    "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923",
    "Call-ID: unreason.1234ksdfak3j2erwedfsASdf",
    "CSeq: 35 INVITE",
    "From: sip:user@example.com;tag=11141343",
    "To: sip:user@example.edu;tag=2229",
    "Content-Length: 154",
    "Content-Type: application/sdp",
    "Contact: <sip:user@host198.example.com>",
    body=sdp("192.0.2.198"),
)

NOREASON = msg(
    "SIP/2.0 100 ",
    "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
    "Call-ID: noreason.asndj203insdf99223ndf",
    "CSeq: 35 INVITE",
    "From: <sip:user@example.com>;tag=39ansfi3",
    "To: <sip:user@example.edu>;tag=902jndnke3",
    "Content-Length: 0",
    "Contact: <sip:user@host105.example.com>",
)

# -- valid at the codec layer though an application may refuse them (§3.2, §3.3) --------------
UNKSM2 = msg(
    "REGISTER sip:example.com SIP/2.0",
    "To: isbn:2983792873",
    "From: <http://www.example.com>;tag=3234233",
    "Call-ID: unksm2.daksdj@hyphenated-host.example.com",
    "CSeq: 234902 REGISTER",
    "Max-Forwards: 70",
    "Via: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bKkdjuw",
    "Contact: <name:John_Smith>",
    "l: 0",
)
BEXT01 = msg(
    "OPTIONS sip:user@example.com SIP/2.0",
    "To: sip:j_user@example.com",
    "From: sip:caller@example.net;tag=242etr",
    "Max-Forwards: 6",
    "Call-ID: bext01.0ha0isndaksdj",
    "Require: nothingSupportsThis, nothingSupportsThisEither",
    "Proxy-Require: noProxiesSupportThis, norDoAnyProxiesSupportThis",
    "CSeq: 8 OPTIONS",
    "Via: SIP/2.0/TLS fold-and-staple.example.com;branch=z9hG4bKkdjuw",
    "Content-Length: 0",
)
CPARAM01 = msg(
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/UDP saturn.example.com:5060;branch=z9hG4bKkdjuw",
    "Max-Forwards: 70",
    "From: sip:watson@example.com;tag=DkfVgjkrtMwaerKKpe",
    "To: sip:watson@example.com",
    "Call-ID: cparam01.70710@saturn.example.com",
    "CSeq: 2 REGISTER",
    "Contact: sip:+19725552222@gw1.example.net;unknownparam",
    "l: 0",
)
CPARAM02 = CPARAM01.replace(
    b"Contact: sip:+19725552222@gw1.example.net;unknownparam",
    b"Contact: <sip:+19725552222@gw1.example.net;unknownparam>",
)
ZEROEXP = msg(
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/TCP 192.0.2.21:5060;branch=z9hG4bKkdjuw",
    "Max-Forwards: 70",
    "From: <sip:user@example.com>;tag=32394234",
    "To: <sip:user@example.com>",
    "Call-ID: zeroexp.0ha0isndaksdj2193423r542w35",
    "CSeq: 3 REGISTER",
    "Contact: <sip:user@192.0.2.21>;expires=0",
    "Expires: 0",
    "l: 0",
)
INV2543 = msg(
    "INVITE sip:UserB@example.com SIP/2.0",
    "Via: SIP/2.0/UDP iftgw.example.com",
    "From: <sip:+13035551111@ift.client.example.net;user=phone>",
    "Record-Route: <sip:UserB@example.com;maddr=ss1.example.com>",
    "To: sip:+16505552222@ss1.example.net;user=phone",
    "Call-ID: inv2543.1717@ift.client.example.com",
    "CSeq: 56 INVITE",
    "Content-Type: application/sdp",
    body=sdp("192.0.2.5"),
)
BCAST = msg(
    "SIP/2.0 200 OK",
    "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923",
    "Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23",
    "Call-ID: bcast.0384840201234ksdfak3j2erwedfsASdf",
    "CSeq: 35 INVITE",
    "From: sip:user@example.com;tag=11141343",
    "To: sip:user@example.edu;tag=2229",
    "Content-Length: 154",
    "Content-Type: application/sdp",
    "Contact: <sip:user@host28.example.com>",
    body=sdp("192.0.2.198"),
)

VALID = {
    "wsinv": WSINV, "intmeth": INTMETH, "esc01": ESC01, "escnull": ESCNULL, "esc02": ESC02,
    "lwsdisp": LWSDISP, "longreq": LONGREQ, "semiuri": SEMIURI, "transports": TRANSPORTS,
    "mpart01": MPART01, "unreason": UNREASON, "noreason": NOREASON, "unksm2": UNKSM2,
    "bext01": BEXT01, "cparam01": CPARAM01, "cparam02": CPARAM02, "zeroexp": ZEROEXP,
    "inv2543": INV2543, "bcast": BCAST,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_torture_messages_parse_and_round_trip_byte_exact(name: str) -> None:
    data = VALID[name]
    m = parse_message(data)
    out = bytes(m)
    if b"\r\n " in data.split(b"\r\n\r\n")[0] or b"\r\n\t" in data.split(b"\r\n\r\n")[0]:
        # Folded lines are unfolded (documented); everything else stays byte-exact.
        assert parse_message(out) == m
        assert bytes(parse_message(out)) == out
    else:
        assert out == data
    assert m.body == data.split(b"\r\n\r\n", 1)[1][: len(m.body)]


def test_wsinv_structured_values() -> None:
    m = parse_message(WSINV)
    assert isinstance(m, Request)
    assert m.max_forwards == 68
    assert (m.cseq.seq, m.cseq.method) == (9, "INVITE")
    assert m.to_tag == "1918181833n" and m.from_tag == "98asjd8"
    assert m.from_.display_name == 'J Rosenberg \\"'
    assert [v.host for v in m.vias] == ["192.0.2.2", "spindle.example.com", "192.168.255.111"]
    assert [v.transport for v in m.vias] == ["UDP", "TCP", "UDP"]
    assert m.vias[1].branch == "z9hG4bK9ikj8" and m.vias[2].branch == "z9hG4bK30239"
    assert not m.vias[0].is_rfc3261
    assert m.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    (contact,) = m.contacts
    assert contact.display_name == 'Quoted string ""'
    assert list(contact.params) == [("newparam", "newvalue"), ("secondparam", None), ("q", "0.33")]
    assert m.routes[0].uri.lr and list(m.routes[0].uri.params)[-1] == ("unknown-no-value", None)
    assert len(m.body) == 150


def test_intmeth_odd_characters() -> None:
    m = parse_message(INTMETH)
    assert isinstance(m, Request)
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    ruri = m.request_uri
    assert ruri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert ruri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert ruri.host == "example.com"
    assert m.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert m.from_tag == "_token~1'+`*%!-."
    assert m.from_.params.get("fromParam''~+*_!.-%") == '"работающий"'
    assert m.headers.get("extensionHeader-!.%*+_`'~") == "大停電"
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"


def test_escapes_and_compact_forms() -> None:
    m = parse_message(ESC01)
    assert m.call_id == "esc01.239409asdfakjkn23onasd0-3234"
    assert m.content_type == "application/sdp"
    assert m.contacts[0].uri.params.get("n%61me") == "v%61lue%25%34%31"
    m2 = parse_message(ESC02)
    assert isinstance(m2, Request) and m2.method == "RE%47IST%45R"
    assert len(m2.contacts) == 2  # C%6Fntact is an unknown header, not Contact
    assert m2.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    m3 = parse_message(ESCNULL)
    assert [str(c.uri) for c in m3.contacts] == ["sip:%00@host5.example.com", "sip:%00%00@host5.example.com"]
    assert m3.content_length == 0


def test_lwsdisp_semiuri_transports_and_dblreq() -> None:
    assert parse_message(LWSDISP).from_.display_name == "caller"
    semi = parse_message(SEMIURI)
    assert isinstance(semi, Request) and semi.request_uri.user == "user;par=u%40example.net"
    assert semi.headers.get_all("Accept")[-1] == "message/sipfrag"
    t = parse_message(TRANSPORTS)
    assert [v.transport for v in t.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    d = parse_message(DBLREQ)
    assert isinstance(d, Request) and d.method == "REGISTER" and d.body == b""


def test_responses_reason_phrases() -> None:
    u = parse_message(UNREASON)
    assert isinstance(u, Response) and u.status_code == 200
    assert u.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    n = parse_message(NOREASON)
    assert isinstance(n, Response) and n.status_code == 100 and n.reason == ""


def test_multipart_body_passes_untouched() -> None:
    m = parse_message(MPART01)
    assert m.body == MPART_BODY
    assert bytes(m).endswith(MPART_BODY)


def test_unknown_schemes_in_addresses_and_wildcards() -> None:
    m = parse_message(UNKSM2)
    assert m.to.uri.scheme == "isbn" and m.to.uri.opaque == "2983792873"
    assert m.contacts[0].uri.scheme == "name"
    c1 = parse_message(CPARAM01).contacts[0]
    assert "unknownparam" in c1.params and "unknownparam" not in c1.uri.params
    c2 = parse_message(CPARAM02).contacts[0]
    assert "unknownparam" in c2.uri.params and "unknownparam" not in c2.params
    assert parse_message(ZEROEXP).expires == 0
    inv = parse_message(INV2543)
    assert inv.max_forwards is None and inv.top_via is not None and inv.top_via.branch is None
    assert inv.body == sdp("192.0.2.5")


# -- invalid -------------------------------------------------------------------------------

BADINV01 = msg(
    "INVITE sip:user@example.com SIP/2.0",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=134161461246",
    "Max-Forwards: 7",
    "Call-ID: badinv01.0ha0isndaksdjasdf3234nas",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP 192.0.2.15;;,;,,",
    'Contact: "Joe" <sip:joe@example.org>;;;;',
    "Content-Length: 152",
    "Content-Type: application/sdp",
    body=sdp("192.0.2.15"),
)
CLERR = msg(
    "INVITE sip:user@example.com SIP/2.0",
    "Max-Forwards: 80",
    "To: sip:j.user@example.com",
    "From: sip:caller@example.net;tag=93942939o2",
    "Contact: <sip:caller@hungry.example.net>",
    "Call-ID: clerr.0ha0isndaksdjweiafasdk3",
    "CSeq: 8 INVITE",
    "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523",
    "Content-Type: application/sdp",
    "Content-Length: 9999",
    body=sdp("192.0.2.155"),
)


def _inv(first: str, *, replace: tuple[str, str] | None = None, extra: tuple[str, ...] = ()) -> bytes:
    lines = [
        first,
        "To: sip:user@example.com",
        "From: sip:caller@example.net;tag=2234923",
        "Max-Forwards: 70",
        "Call-ID: torture.239423mnsadf3j23lj42--sedfnm234",
        "CSeq: 1392934 INVITE",
        "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw",
        "Contact: <sip:caller@host5.example.net>",
        *extra,
        "Content-Type: application/sdp",
        "Content-Length: 150",
    ]
    if replace:
        lines = [replace[1] if ln.startswith(replace[0]) else ln for ln in lines]
    return msg(*lines, body=sdp("192.0.2.5"))


INVALID: dict[str, tuple[bytes, int]] = {
    "badinv01": (BADINV01, 400),
    "clerr": (CLERR, 400),
    "scalar02": (_inv("INVITE sip:user@example.com SIP/2.0", replace=("Content-Length", "Content-Length: -999")), 400),
    "scalarlg": (
        msg(
            "REGISTER sip:example.com SIP/2.0",
            "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3",
            "To: <sip:user@example.com>",
            "From: <sip:user@example.com>;tag=239232jh3",
            "CSeq: 36893488147419103232 REGISTER",
            "Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32",
            "Max-Forwards: 300",
            "Expires: 1000000000000000000000000000000000000000000",
            "Contact: <sip:user@host129.example.com>;expires=280297596632815",
            "Content-Length: 0",
        ),
        400,
    ),
    "quotbal": (_inv("INVITE sip:user@example.com SIP/2.0", replace=("To:", 'To: "Mr. J. User <sip:j.user@example.com>')), 400),
    "ltgtruri": (_inv("INVITE <sip:user@example.com> SIP/2.0"), 400),
    "lwsruri": (_inv("INVITE sip:user@example.com; lr SIP/2.0"), 400),
    "lwsstart": (_inv("INVITE  sip:user@example.com  SIP/2.0"), 400),
    "trws": (_inv("INVITE sip:user@example.com SIP/2.0 "), 400),
    "escruri": (_inv("INVITE sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0"), 400),
    "baddate": (_inv("INVITE sip:user@example.com SIP/2.0", extra=("Date: Fri, 01 Jan 2010 16:00:00 EST",)), 400),
    "regbadct": (
        msg(
            "REGISTER sip:example.com SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:user@example.com;tag=998332",
            "Max-Forwards: 70",
            "Call-ID: regbadct.k345asrl3fdbv@10.0.0.1",
            "CSeq: 1 REGISTER",
            "Via: SIP/2.0/UDP 135.180.130.133:5060;branch=z9hG4bKkdjuw",
            "Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            "l: 0",
        ),
        400,
    ),
    "badaspec": (
        _inv("INVITE sip:user@example.com SIP/2.0", replace=("To:", 'To: "Watson, Thomas" < sip:t.watson@example.org >')),
        400,
    ),
    "baddn": (
        _inv("INVITE sip:user@example.com SIP/2.0", replace=("From:", "From: Bell, Alexander <sip:a.g.bell@example.com>;tag=43")),
        400,
    ),
    "badvers": (_inv("INVITE sip:t.watson@example.org SIP/7.0"), 505),
    "mismatch01": (_inv("OPTIONS sip:user@example.com SIP/2.0"), 400),
    "mismatch02": (_inv("NEWMETHOD sip:user@example.com SIP/2.0"), 400),
    "bigcode": (
        msg(
            "SIP/2.0 4294967301 better not break the receiver",
            "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
            "Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i",
            "CSeq: 353494 INVITE",
            "From: <sip:user@example.com>;tag=39ansfi3",
            "To: <sip:user@example.edu>;tag=902jndnke3",
            "Content-Length: 0",
        ),
        400,
    ),
    "badbranch": (_inv("INVITE sip:user@example.com SIP/2.0", replace=("Via:", "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK")), 400),
    "insuf": (
        msg(
            "INVITE sip:user@example.com SIP/2.0",
            "CSeq: 193942 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf",
            "Content-Type: application/sdp",
            "l: 150",
            body=sdp("192.0.2.5"),
        ),
        400,
    ),
    "unkscm": (_inv("OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0"), 416),
    "novelsc": (_inv("OPTIONS soap.beep://192.0.2.103:3002 SIP/2.0"), 416),
    "multi01": (
        _inv("INVITE sip:user@company.com SIP/2.0", extra=("CSeq: 59 INVITE", "Call-ID: multi01.98asdh@192.0.2.2", "To: sip:other@example.net")),
        400,
    ),
    "mcl01": (_inv("INVITE sip:user@example.com SIP/2.0", extra=("Content-Length: 151",)), 400),
    "hdrnocolon": (_inv("INVITE sip:user@example.com SIP/2.0", extra=("NoColonHere",)), 400),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_torture_messages_raise_with_rfc_status(name: str) -> None:
    data, status = INVALID[name]
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.status_code == status, info.value.reason


def test_mismatch_and_unknown_scheme_fixtures_are_otherwise_valid() -> None:
    # Guard against the invalid fixtures failing for an unintended reason.
    good = _inv("INVITE sip:user@example.com SIP/2.0")
    assert isinstance(parse_message(good), Request)
    assert NameAddr.parse('"Watson, Thomas" <sip:t.watson@example.org>').display_name == "Watson, Thomas"


def test_oversize_is_413() -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(LONGREQ, max_message_bytes=1000)
    assert info.value.status_code == 413
