"""The directory snapshot: identities, authentication, search and paging, 100,000 users."""

from __future__ import annotations

import uuid
from pathlib import Path

from edge.config import LabConfig
from mock_ucm.directory import SEARCH_MAX_LIMIT, Directory, device_model, device_pkid

from .conftest import lab_config


def test_users_devices_and_cluster_from_config(config: LabConfig, directory: Directory) -> None:
    assert len(directory) == 3 + 30
    alice = directory.get_user("alice")
    assert alice is not None
    assert (alice.dn, alice.first_name, alice.last_name) == ("1001", "Alice", "Example")
    assert alice.email == "alice@example.com"
    [csf] = alice.devices
    assert csf.name == "CSFALICE"
    assert csf.model == "Cisco Unified Client Services Framework"
    assert csf.pkid == device_pkid("CSFALICE") == str(uuid.UUID(csf.pkid))
    bob = directory.get_user("BOB")  # user ids are case-insensitive, as on Unified CM
    assert bob is not None and [d.name for d in bob.devices] == ["CSFBOB", "BOTBOB"]
    assert bob.devices[1].model == "Cisco Dual Mode for Android"
    assert directory.cluster_name == config.ucm[0].fqdn == "ucm1.example.com"
    assert [n.fqdn for n in directory.nodes] == ["ucm1.example.com"]
    assert directory.get_device("csfalice") == (alice, csf)
    assert directory.get_device_by_pkid("{" + csf.pkid.upper() + "}") == (alice, csf)
    load = directory.get_user_by_dn("20001")
    assert load is not None and load.username == "load00001" and load.display_name == "load00001"


def test_pkids_are_deterministic_across_builds(config: LabConfig) -> None:
    a, b = Directory.from_config(config), Directory.from_config(config)
    assert [u.pkid for u in a.users()] == [u.pkid for u in b.users()]
    assert device_pkid("CSFALICE") == device_pkid("csfalice") != device_pkid("CSFBOB")
    namespace = uuid.uuid5(uuid.NAMESPACE_DNS, "pkid.mra-edge-lab")
    for name in ("CSFALICE", "SEP0011223344AA", "X" * 40):
        assert device_pkid(name) == str(uuid.uuid5(namespace, "device:" + name))
    assert device_model("SEP0011223344AA") == "Cisco 8865"
    assert device_model("XYZ") == "Third-party SIP Device (Advanced)"


def test_authenticate(directory: Directory) -> None:
    assert directory.authenticate("alice", "lab-pass")
    assert directory.authenticate("ALICE", "lab-pass")
    assert not directory.authenticate("alice", "wrong")
    assert not directory.authenticate("alice", "")
    assert not directory.authenticate("nobody", "lab-pass")


def test_search_filters_are_prefixes_and_combine(directory: Directory) -> None:
    assert [u.username for u in directory.search(last="exam").users] == ["alice", "bob"]
    assert [u.username for u in directory.search(name="car").users] == ["carol"]
    assert [u.username for u in directory.search(name="smi").users] == ["carol"]  # last name
    assert [u.username for u in directory.search(number="100").users] == ["alice", "bob", "carol"]
    assert [u.username for u in directory.search(number="100", first="b").users] == ["bob"]
    assert directory.search(name="zzz").total == 0


def test_search_paging_reports_the_total(directory: Directory) -> None:
    first = directory.search(name="load", start=0, max_results=10)
    rest = directory.search(name="load", start=10, max_results=100)
    assert first.total == rest.total == 30
    assert len(first.users) == 10 and len(rest.users) == 20
    names = [u.username for u in (*first.users, *rest.users)]
    assert names == [f"load{i:05d}" for i in range(1, 31)]
    assert directory.search().total == 33
    assert len(directory.search(max_results=10_000).users) == 33
    assert directory.search(start=1000).users == ()


def test_one_hundred_thousand_users(tmp_path: Path) -> None:
    directory = Directory.from_config(lab_config(tmp_path, "load.count=100000"))
    assert len(directory) == 100_002
    result = directory.search(number="2999", max_results=5)
    assert result.total == 10  # 29990..29999 (DNs run 20001..120000)
    assert [u.dn for u in result.users] == sorted(u.dn for u in result.users)
    assert len(directory.search(name="load", max_results=10_000).users) == SEARCH_MAX_LIMIT
    assert directory.search(name="load").total == 100_000
    user = directory.get_user("load100000")
    assert user is not None and user.dn == "120000"
    assert directory.authenticate("load54321", "lab-pass")
    assert directory.get_device("CSFLOAD54321") is not None
