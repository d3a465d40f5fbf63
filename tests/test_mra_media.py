"""SRTP media over MRA through the real processes (spec §7): the client emulator calls the echo
number 9999 through E and C; media flows client ↔ E (external relay port) ↔ C (SRTP terminated,
re-encrypted with C's key) ↔ the inside echo (plain RTP), and every packet comes back intact."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from media_relay import fastpath
from mra_client.call import CallReport, place_call
from mra_client.demo import lab_client_settings
from mra_client.edge_http import StepError
from mra_client.signin import Ladder, sign_in, sign_out
from tests.conftest import RunningLab
from tests.media.kernel_tools import require_kernel, require_srtp_kernel

CM_SUITES = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
GCM_SUITES = ("AEAD_AES_128_GCM", "AEAD_AES_256_GCM")


async def _call(lab: RunningLab, suite: str, seconds: float = 2.0) -> CallReport:
    session = await sign_in(lab_client_settings(lab.config, "alice"), Ladder())
    try:
        assert session.sip is not None
        return await place_call(session.sip, "9999", seconds, suite=suite)
    finally:
        await sign_out(session)


def _check(lab: RunningLab, report: CallReport, suite: str) -> None:
    e = lab.config.expe[0]
    assert report.remote[0] == e.external_address, "media goes to E's relay, not around the edge"
    assert e.media_port_min <= report.remote[1] <= e.media_port_max and report.remote[1] % 2 == 0
    assert report.suite == suite
    assert report.sent == 100
    assert report.received == report.sent, report
    assert report.mismatched == 0, "payload bytes and sequence numbers come back unchanged"
    assert report.auth_failures == 0
    assert report.bye_status == 200


@pytest.mark.parametrize("suite", CM_SUITES)
def test_echo_call_srtp_both_ways(lab: RunningLab, suite: str) -> None:
    report = asyncio.run(_call(lab, suite))
    _check(lab, report, suite)
    relayed = lab.component("expe")["media"]
    assert relayed, "E reports its media relay"
    # The status says which relay path E runs; the lab inherits EDGE_MEDIA_FASTPATH from here.
    worker = relayed["worker"]
    assert worker["fastpath"] == ("native" if fastpath.available() else "python")
    if worker["fastpath"] == "native":
        assert worker["native"]["forwarded"] >= report.received, "established flows relayed natively"
        # io_uring by default; epoll only where the kernel refused it, and then the status says why
        for name, media in (("expe", relayed), ("expc", lab.component("expc")["sip"]["media"])):
            info = media["worker"]
            assert info["native"]["backend"] == "io_uring" or "uring_error" in info, (name, info)
    assert relayed["totals"]["rx_packets"] >= 2 * report.sent, "E counts what it relayed (both ways)"


def media_metrics(lab: RunningLab, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, labels without component/role): value} of ``edge_media_*`` on ``name``."""
    admin = next(c["admin"] for c in lab.status()["components"] if c["name"] == name)
    with urllib.request.urlopen(f"http://{admin['host']}:{admin['port']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("edge_media_"):
                labels = tuple(
                    sorted((k, v) for k, v in sample.labels.items() if k not in ("component", "role"))
                )
                out[(sample.name, labels)] = sample.value
    return out


def test_media_counters_in_metrics(lab: RunningLab) -> None:
    """E's and C's ``/metrics`` carry the media totals that ``/status`` shows (spec §7)."""
    before = {name: media_metrics(lab, name) for name in ("expe", "expc")}
    report = asyncio.run(_call(lab, CM_SUITES[0]))
    _check(lab, report, CM_SUITES[0])
    for name in ("expe", "expc"):
        after = media_metrics(lab, name)
        for direction in ("rx", "tx"):
            key = ("edge_media_packets_total", (("direction", direction),))
            # both ways: the client's 100 packets and the echo's 100 (plus C's pinholes, RTCP)
            assert after[key] - before[name].get(key, 0.0) >= 2 * report.sent, (name, direction)
        assert ("edge_media_streams", ()) in after
        assert ("edge_media_drops_total", (("reason", "garbage"),)) in after
    assert ("edge_media_srtp_auth_failures", ()) in media_metrics(lab, "expc")


def test_gcm_suites_need_the_aes_gcm_option(lab: RunningLab, lab_factory: Any) -> None:
    with pytest.raises(StepError) as refused:
        asyncio.run(_call(lab, "AEAD_AES_128_GCM"))
    assert refused.value.detail.startswith("488")
    gcm_lab = lab_factory("expc.aes_gcm=true")
    for suite in GCM_SUITES:
        _check(gcm_lab, asyncio.run(_call(gcm_lab, suite)), suite)


def test_echo_call_with_e_forwarding_in_the_kernel(lab_factory: Any) -> None:
    """``media_kernel_forwarding`` on E (root only): the call's established media goes through the
    kernel program; E still latches, counts both ways and reports the flows."""
    require_kernel()
    kernel_lab = lab_factory("expe.0.media_kernel_forwarding=true")
    suite = CM_SUITES[0]
    report = asyncio.run(_call(kernel_lab, suite))
    _check(kernel_lab, report, suite)
    relayed = kernel_lab.component("expe")["media"]
    worker = relayed["worker"]
    assert worker["kernel"]["installs"] >= 2, worker  # the client's RTP leg and C's
    assert worker["native"]["forwarded"] < report.received, "most packets never reached E's process"
    assert relayed["totals"]["rx_packets"] >= 2 * report.sent, "the kernel's counts are folded in"


@pytest.mark.parametrize("suite", CM_SUITES)
def test_echo_call_with_c_transcoding_in_the_kernel(lab_factory: Any, suite: str) -> None:
    """``media_kernel_srtp`` on C and ``media_kernel_forwarding`` on E (root only): the call's
    established media is decrypted and encrypted by C's kernel program (``kernel_srtp.py``);
    C's relay process transcodes only a leg's first packets, and its counters still add up."""
    require_srtp_kernel()
    kernel_lab = lab_factory("expe.0.media_kernel_forwarding=true", "expc.media_kernel_srtp=true")
    report = asyncio.run(_call(kernel_lab, suite))
    _check(kernel_lab, report, suite)
    media = kernel_lab.component("expc")["sip"]["media"]
    worker = media["worker"]
    assert worker["kernel"]["srtp"] and worker["kernel"]["installs"] >= 2, worker
    assert worker["native"]["transcoded"] < report.received, "most packets never reached C's process"
    assert media["totals"]["rx_packets"] >= 2 * report.sent, "the kernel's counts are folded in"
    assert media["totals"]["transcode_drops"] == 0
