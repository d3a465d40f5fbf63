"""Which certificates the lab needs, derived from the configuration (spec §3)."""

from __future__ import annotations

from pathlib import Path

from edge.config import LabConfig
from edge.pki import CertSpec, LabPki, ensure_lab_pki, load_lab_pki


def cert_dir(config: LabConfig) -> Path:
    return config.lab.state_path / "certs"


def cert_specs(config: LabConfig) -> list[CertSpec]:
    domain = config.lab.domain
    specs: list[CertSpec] = []
    for e in config.expe:
        # E: its FQDN, every edge domain, collab-edge.<domain>, and the SRVName otherName.
        specs.append(
            CertSpec(
                name=e.name,
                common_name=e.fqdn,
                dns_names=(e.fqdn, domain, f"collab-edge.{domain}"),
                ip_addresses=(e.external_address, e.internal_address),
                srv_names=(f"_collab-edge._tls.{domain}",),
            )
        )
    c = config.expc
    specs.append(
        CertSpec(
            name=c.name,
            common_name=c.fqdn,
            dns_names=tuple(dict.fromkeys((c.fqdn, c.cluster_name))),
            ip_addresses=(c.address,),
            srv_names=(),
        )
    )
    for node in (*config.ucm, *config.imp, *config.cuc):
        # IM&P also serves the presence domain: XMPP clients check it against the JID's domain.
        names = (node.fqdn, domain) if node in config.imp else (node.fqdn,)
        specs.append(
            CertSpec(
                name=node.name,
                common_name=node.fqdn,
                dns_names=names,
                ip_addresses=(node.address,),
                srv_names=(),
            )
        )
    return specs


def ensure_certificates(config: LabConfig) -> LabPki:
    """Generate the lab CA and every certificate if absent; renew expired or renamed ones."""
    return ensure_lab_pki(cert_dir(config), cert_specs(config))


def lab_pki(config: LabConfig) -> LabPki:
    """The PKI as a component process sees it: created on first use, otherwise only read."""
    directory = cert_dir(config)
    if not (directory / "ca.pem").exists():
        return ensure_certificates(config)
    return load_lab_pki(directory)
