"""The C half of the per-exit path (shared/hotpath.c): a plain shared library that
`vmsuper.shared.hotpath` loads with ctypes. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vmsuper.shared._hotpath",
            sources=["shared/hotpath.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
        )
    ]
)
