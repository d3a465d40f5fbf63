"""A traversal zone with two Expressway-E peers (a cluster, spec §8: up to 6): C keeps every
channel to each peer, get_edge_config lists both, and a client signs in through either."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mra_client.edge_http import EdgeHttpClient
from tests.conftest import RunningLab, _free_block, lab_overrides


def test_two_edge_peers(tmp_path: Path) -> None:
    block = _free_block()
    p = f"127.{block}"
    toml = tmp_path / "cluster.toml"
    toml.write_text(
        f"""
[[expe]]
name = "expe"
fqdn = "expe.example.com"
external_address = "{p}.1.10"
internal_address = "{p}.2.10"

[[expe]]
name = "expe2"
fqdn = "expe2.example.com"
external_address = "{p}.1.11"
internal_address = "{p}.2.11"

[expc.zone]
peers = ["expe", "expe2"]
"""
    )
    state = tmp_path / "state"
    overrides = [o for o in lab_overrides(state, block) if not o.startswith("expe.0.")]
    lab = RunningLab(state, overrides, config_file=toml)
    lab.up()
    try:
        zone = lab.component("expc")["zones"][0]
        assert zone["state"] == "Active", zone
        channels = {(c["channel"], c["peer"]) for c in zone["channels"]}
        assert channels == {(ch, peer) for ch in ("sip", "https", "xmpp") for peer in ("expe", "expe2")}
        for name in ("expe", "expe2"):
            assert lab.component(name)["zones"][0]["state"] == "Active"

        async def signin(address: str, fqdn: str) -> list[tuple[str, int]]:
            async with EdgeHttpClient(
                domain="example.com",
                edge_host=fqdn,
                edge_port=8443,
                edge_address=address,
                ca_file=str(state / "certs" / "ca.pem"),
            ) as c:
                config, _ = await c.get_edge_config("alice", "lab-pass")
                version = await c.internal_get("uds", "https", "ucm1.example.com", 8443, "/cucm-uds/version")
                assert version.status == 200
                return config.sip_edge

        for address, fqdn in ((f"{p}.1.10", "expe.example.com"), (f"{p}.1.11", "expe2.example.com")):
            sip_edges = asyncio.run(signin(address, fqdn))
            assert sip_edges == [("expe.example.com", 5061), ("expe2.example.com", 5061)]
    finally:
        lab.down()
