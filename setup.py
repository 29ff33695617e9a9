"""The C half of the per-exit path (shared/hotpath.c), compiled into the cffi module
`vmsuper.shared._hotpath` (see shared/hotpath_build.py). Everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["shared/hotpath_build.py:ffibuilder"])
