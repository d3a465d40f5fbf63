"""The mock UCM registrar core with a fake clock (spec §5): bindings, expiry, MRA markers, auth."""

from __future__ import annotations

from edge.config import LabConfig
from edge.sip.auth import compute_authorization
from edge.sip.message import Response, new_call_id
from mock_ucm.sip.registrar import AR_SK_SUPPORTED, Registrar, device_name
from tests.ucm.conftest import T0
from tests.ucm.sip_helpers import mra_contact, register

C_HOST, C_PORT = "127.10.3.10", 5060


def make_registrar(config: LabConfig, *, secret: bytes | None = b"s" * 32) -> Registrar:
    return Registrar(config.all_users(), domain="example.com", node_name="ucm1", digest_secret=secret)


def alice_contact(device: str = "CSFALICE") -> str:
    return mra_contact("1001", C_HOST, C_PORT, device)


def test_register_stores_contact_byte_exact_and_grants_120(config: LabConfig) -> None:
    reg = make_registrar(config)
    contact = alice_contact()
    resp = reg.handle_register(register("1001", contact, expires=3600), T0)
    assert resp.status_code == 200
    assert resp.headers.get("expires") == "120"
    assert resp.headers.get_all("contact") == [contact + ";expires=120"]
    assert resp.headers.get("supported") == AR_SK_SUPPORTED
    [b] = reg.bindings_for("alice")
    assert b.contact == contact
    assert b.uri == f"sip:1001@{C_HOST}:{C_PORT};transport=tcp;orig-hostport=198.51.100.7:51000"
    assert device_name(b) == "CSFALICE" and b.mra_ha
    assert reg.registered == 1 and reg.counters.peak == 1


def test_register_by_username_and_dn_are_the_same_user(config: LabConfig) -> None:
    reg = make_registrar(config)
    reg.handle_register(register("alice", alice_contact()), T0)
    resp = reg.handle_register(register("1001", alice_contact()), T0 + 10)
    assert resp.status_code == 200
    assert reg.registered == 1 and reg.counters.refreshes == 1
    assert reg.find_user("1001") is reg.find_user("ALICE")


def test_no_ar_sk_for_plain_clients_and_supported_header_counts(config: LabConfig) -> None:
    reg = make_registrar(config)
    plain = "<sip:1001@127.0.0.1:5070;transport=tcp>"
    resp = reg.handle_register(register("1001", plain), T0)
    assert resp.status_code == 200 and "supported" not in resp.headers
    resp = reg.handle_register(
        register("1001", plain, extra=[("Supported", "path, X-cisco-mra-ha=AR_SK")]), T0
    )
    assert resp.headers.get("supported") == AR_SK_SUPPORTED


def test_refresh_expiry_and_timer(config: LabConfig) -> None:
    reg = make_registrar(config)
    reg.handle_register(register("1001", alice_contact()), T0)
    assert reg.get_timer() == T0 + 120
    reg.handle_register(register("1001", alice_contact()), T0 + 60)
    assert reg.get_timer() == T0 + 180  # the refresh moved the deadline
    assert reg.handle_timer(T0 + 179) == []
    expired = reg.handle_timer(T0 + 180)
    assert [b.username for b in expired] == ["alice"]
    assert reg.registered == 0 and reg.counters.expirations == 1 and reg.get_timer() is None


def test_requested_expiry_is_always_answered_120(config: LabConfig) -> None:
    reg = make_registrar(config)
    resp = reg.handle_register(register("1001", alice_contact() + ";expires=30", expires=None), T0)
    assert resp.headers.get("expires") == "120"
    assert resp.headers.get_all("contact")[0].endswith(";x-cisco-mra-ha=AR_SK;expires=120")


def test_unregister_with_expires_zero(config: LabConfig) -> None:
    reg = make_registrar(config)
    reg.handle_register(register("1001", alice_contact()), T0)
    resp = reg.handle_register(register("1001", alice_contact(), expires=0), T0 + 5)
    assert resp.status_code == 200 and "contact" not in resp.headers
    assert reg.registered == 0 and reg.counters.unregistrations == 1
    assert reg.counters.peak == 1


def test_star_removes_all_bindings_and_needs_expires_zero(config: LabConfig) -> None:
    reg = make_registrar(config)
    reg.handle_register(register("1002", mra_contact("1002", C_HOST, C_PORT, "CSFBOB")), T0)
    reg.handle_register(register("1002", mra_contact("1002", C_HOST, C_PORT, "BOTBOB")), T0)
    assert reg.registered == 2
    assert reg.handle_register(register("1002", "*", expires=60), T0).status_code == 400
    resp = reg.handle_register(register("1002", "*", expires=0), T0)
    assert resp.status_code == 200 and reg.registered == 0


def test_query_without_contact_lists_bindings(config: LabConfig) -> None:
    reg = make_registrar(config)
    reg.handle_register(register("1001", alice_contact()), T0)
    resp = reg.handle_register(register("1001", None, expires=None), T0 + 20)
    assert resp.headers.get_all("contact") == [alice_contact() + ";expires=100"]
    assert "expires" not in resp.headers


def test_unknown_user_404_with_warning(config: LabConfig) -> None:
    reg = make_registrar(config)
    resp = reg.handle_register(register("7777", alice_contact()), T0)
    assert resp.status_code == 404
    assert resp.headers.get("warning") == '399 ucm1 "Unknown user"'
    assert reg.counters.failures == 1


def test_device_not_associated_403_with_warning(config: LabConfig) -> None:
    reg = make_registrar(config)
    resp = reg.handle_register(register("1001", alice_contact("CSFBOB")), T0)
    assert resp.status_code == 403
    assert resp.headers.get("warning") == '399 ucm1 "Device not associated"'
    assert reg.registered == 0


def test_path_mode_stores_path_and_echoes_it(config: LabConfig) -> None:
    reg = make_registrar(config)
    contact = '<sip:1001@198.51.100.7:51000;transport=tls>;+u.sip!devicename.ccm.cisco.com="CSFALICE"'
    path = f"<sip:{C_HOST}:5060;transport=tcp;lr>"
    resp = reg.handle_register(register("1001", contact, extra=[("Path", path)]), T0)
    assert resp.headers.get_all("path") == [path]
    [b] = reg.bindings_for("alice")
    assert b.paths == (path,) and b.contact == contact


def test_digest_challenge_then_accept(config: LabConfig) -> None:
    config.users[0].digest_auth = True
    reg = make_registrar(config)
    req = register("1001", alice_contact(), call_id=new_call_id())
    challenge = reg.handle_register(req, T0)
    assert challenge.status_code == 401
    www = challenge.headers.get("www-authenticate") or ""
    assert www.startswith("Digest ") and 'realm="ccmsipline"' in www
    assert reg.registered == 0 and reg.counters.challenges == 1

    auth = compute_authorization(www, "REGISTER", req.uri, "alice", "wrong")
    bad = reg.handle_register(register("1001", alice_contact(), cseq=2, extra=[("Authorization", auth)]), T0)
    assert bad.status_code == 401 and reg.counters.failures == 1

    auth = compute_authorization(www, "REGISTER", req.uri, "alice", "lab-pass")
    ok = reg.handle_register(
        register("1001", alice_contact(), cseq=3, extra=[("Authorization", auth)]), T0 + 1
    )
    assert ok.status_code == 200 and reg.registered == 1


def test_digest_stale_nonce_is_rechallenged(config: LabConfig) -> None:
    config.users[0].digest_auth = True
    reg = make_registrar(config)
    req = register("1001", alice_contact())
    www = reg.handle_register(req, T0).headers.get("www-authenticate") or ""
    auth = compute_authorization(www, "REGISTER", req.uri, "alice", "lab-pass")
    resp: Response = reg.handle_register(
        register("1001", alice_contact(), extra=[("Authorization", auth)]), T0 + 3600
    )
    assert resp.status_code == 401 and "stale=true" in (resp.headers.get("www-authenticate") or "")


def test_non_digest_users_need_no_credentials(config: LabConfig) -> None:
    reg = make_registrar(config)
    assert (
        reg.handle_register(register("1003", mra_contact("1003", C_HOST, C_PORT, "CSFCAROL")), T0).status_code
        == 200
    )


def test_display_name_with_angle_brackets_keeps_the_contact_uri(config: LabConfig) -> None:
    """A quoted display name may hold '<' and '>' (RFC 3261 §25.1): the stored URI is the one
    inside the real <...>, and the 200 sets expires after it, not inside the quotes."""
    reg = make_registrar(config)
    contact = '"Alice <desk>" ' + alice_contact()
    resp = reg.handle_register(register("1001", contact + ";expires=60"), T0)
    assert resp.headers.get_all("contact") == [contact + ";expires=120"]
    [b] = reg.bindings_for("alice")
    assert b.uri == f"sip:1001@{C_HOST}:{C_PORT};transport=tcp;orig-hostport=198.51.100.7:51000"
