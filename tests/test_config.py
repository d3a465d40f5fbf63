"""Configuration: embedded defaults, TOML file, environment and CLI overrides, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge.config import ConfigError, LabConfig, dump_toml, load_config
from tests.conftest import edge_cli


def test_embedded_defaults_match_the_spec() -> None:
    config = load_config(environ={})
    assert config.lab.domain == "example.com"
    e = config.expe[0]
    assert (e.https_port, e.sip_tls_port, e.xmpp_port) == (8443, 5061, 5222)
    assert (e.traversal_sip_port, e.tunnel_port, e.traversal_xmpp_port) == (7001, 2222, 7400)
    assert (e.demux_rtp_port, e.demux_rtcp_port) == (2776, 2777)
    assert (e.media_port_min, e.media_port_max) == (36002, 59999)
    assert e.sip_tcp_port is None
    assert config.expc.zone.max_hops == 15
    assert config.expc.access.credentials_refresh_min == 480
    assert config.expc.access.auth_rate_max == 8
    users = {u.username: u for u in config.users}
    assert users["alice"].dn == "1001" and users["bob"].dn == "1002"
    assert users["alice"].password == "lab-pass"
    assert users["alice"].device_names == ["CSFALICE"]
    assert config.echo_number == "9999"


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "lab.toml"
    f.write_text('[lab]\ndomain = "corp.test"\n[expc]\nsip_path_headers = true\n[load]\ncount = 3\n')
    config = load_config(f, environ={})
    assert config.lab.domain == "corp.test"
    assert config.expc.sip_path_headers is True
    assert config.expc.zone.username == "traversal"  # untouched defaults survive a partial table
    load_users = [u for u in config.all_users() if u.username.startswith("load")]
    assert [(u.username, u.dn) for u in load_users] == [
        ("load00001", "20001"),
        ("load00002", "20002"),
        ("load00003", "20003"),
    ]


def test_environment_then_cli_overrides_win() -> None:
    env = {"EDGE__EXPC__UCM_TRANSPORT": "tls", "EDGE__EXPE__0__HTTPS_PORT": "9443"}
    config = load_config(environ=env, overrides=["expe.0.https_port=10443"])
    assert config.expc.ucm_transport == "tls"
    assert config.expe[0].https_port == 10443


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("expc.bogus=1", "expc.bogus: unknown key"),
        ("expe.0.https_port=70000", "expe.0.https_port: Input should be less than or equal to 65535"),
        ('dns.address="not-an-ip"', "dns.address: Value error, not an IP address"),
        ('expc.ucm_transport="udp"', "expc.ucm_transport: Input should be 'tcp' or 'tls'"),
        ('expc.zone.peers=["nope"]', "expc.zone.peers names 'nope', which is not an expe node"),
        ("load.count=-1", "load.count: Value error, load population count"),
    ],
)
def test_bad_key_or_value_names_the_key_and_reason(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides=[override])
    assert expected in str(info.value)


def test_bad_toml_file_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[lab\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", environ={})


def test_dump_is_valid_toml_that_round_trips() -> None:
    config = load_config(environ={}, overrides=['expc.allow_rules=[{url="https://ucm1.example.com:8443/x"}]'])
    text = dump_toml(config)
    again = LabConfig.model_validate(tomllib.loads(text))
    assert again == config


def test_cli_config_show_and_error_exit(tmp_path: Path) -> None:
    shown = edge_cli("config", "show", "--set", "lab.domain=corp.test")
    assert 'domain = "corp.test"' in shown.stdout
    bad = edge_cli("config", "show", "--set", "expe.0.xmpp_port=abc", check=False)
    assert bad.returncode != 0
    assert "expe.0.xmpp_port" in bad.stderr
    assert "Traceback" not in bad.stderr
