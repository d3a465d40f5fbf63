"""Build configuration beyond pyproject.toml: the relay's optional native fast path.

``media_relay/_fastpath.c`` is a CPython extension (Linux: recvmmsg/sendmmsg/epoll). It is
``optional``: without a C compiler or the Python headers ``pip install -e .`` still succeeds and
the relay runs its pure-Python path (``media_relay.fastpath.available()`` is then False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "media_relay._fastpath",
            sources=["media_relay/_fastpath.c"],
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
            optional=True,
        )
    ]
)
