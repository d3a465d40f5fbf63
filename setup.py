"""Build configuration beyond pyproject.toml: the relay's optional native fast path.

``media_relay/_fastpath.c`` is a CPython extension (Linux: io_uring, or recvmmsg/sendmmsg/epoll). It is
``optional``: without a C compiler or the Python headers ``pip install -e .`` still succeeds and
the relay runs its pure-Python path (``media_relay.fastpath.available()`` is then False).

``media_relay/_srtp.c`` adds C's SRTP transcoding when libsrtp2 is found (``pkg-config
libsrtp2``, Debian ``libsrtp2-dev``; or its header in the usual place): ``HAVE_SRTP``. With
OpenSSL's libcrypto as well (``libssl-dev``), ``_srtp_ossl.c`` plugs OpenSSL's AES and SHA-1
into libsrtp's crypto kernel (Debian builds libsrtp2 on NSS, which is ~10x slower per packet):
``HAVE_OPENSSL_PRIMITIVES``. Either missing: the extension builds without that part, and C's
transcoding stays on the Python path (pylibsrtp). ``EDGE_MEDIA_NO_SRTP=1`` builds without both.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from setuptools import Extension, setup


def _pkg_config(name: str) -> tuple[list[str], list[str], list[str]] | None:
    """(include dirs, library dirs, libraries) of an installed pkg-config package, or None."""
    if shutil.which("pkg-config") is None:
        return None
    try:
        cflags = subprocess.run(
            ["pkg-config", "--cflags", name], check=True, capture_output=True, text=True
        ).stdout.split()
        libs = subprocess.run(
            ["pkg-config", "--libs", name], check=True, capture_output=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return (
        [f[2:] for f in cflags if f.startswith("-I")],
        [f[2:] for f in libs if f.startswith("-L")],
        [f[2:] for f in libs if f.startswith("-l")],
    )


def _find(name: str, header: str, fallback_lib: str) -> tuple[list[str], list[str], list[str]] | None:
    found = _pkg_config(name)
    if found is not None:
        return found
    if any(os.path.exists(os.path.join(d, header)) for d in ("/usr/include", "/usr/local/include")):
        return [], [], [fallback_lib]
    return None


def _fastpath() -> Extension:
    sources = ["media_relay/_fastpath.c", "media_relay/_srtp.c"]
    macros: list[tuple[str, str | None]] = []
    include_dirs: list[str] = []
    library_dirs: list[str] = []
    libraries: list[str] = []
    srtp = None if os.environ.get("EDGE_MEDIA_NO_SRTP") == "1" else _find("libsrtp2", "srtp2/srtp.h", "srtp2")
    if srtp is not None:
        macros.append(("HAVE_SRTP", "1"))
        for into, part in zip((include_dirs, library_dirs, libraries), srtp, strict=True):
            into.extend(part)
        crypto = _find("libcrypto", "openssl/evp.h", "crypto")
        if crypto is not None:
            macros.append(("HAVE_OPENSSL_PRIMITIVES", "1"))
            sources.append("media_relay/_srtp_ossl.c")
            for into, part in zip((include_dirs, library_dirs, libraries), crypto, strict=True):
                into.extend(part)
    return Extension(
        "media_relay._fastpath",
        sources=sources,
        depends=["media_relay/_srtp.h", "media_relay/_uring.h", "media_relay/_helper.h"],
        define_macros=macros,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        extra_compile_args=[
            "-O2",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            "-Wno-missing-field-initializers",
        ],
        optional=True,
    )


setup(
    ext_modules=[
        _fastpath(),
        # SIP fast path's byte scans (edge/sip/_scan.c); optional: edge.sip.fastpath has the
        # same scans in Python.
        Extension(
            "edge.sip._scan",
            sources=["edge/sip/_scan.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
