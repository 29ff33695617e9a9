"""How the C hot path (`hotpath.c`) becomes the cffi module `vmsuper.shared._hotpath`.

cffi's API mode: the declarations below are what Python may call and read, and the module cffi
generates from them is compiled together with `hotpath.c` itself, so the C compiler checks
every prototype and every struct field against the real definitions (a mismatch fails the
build, or the module's first use for a struct's size). The shared-memory structs and enums
are declared from `abi.py`, as `vms_abi.h` is. `setup.py` names this file in
``cffi_modules``, so `pip install -e .` (and `./dev`, when one of these files changes) builds it.

The module also carries a digest of the files it was built from (`hotpath_source.py`), so a
stale build is refused with the command that rebuilds it instead of being misread.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
_source = runpy.run_path(str(HERE / "hotpath_source.py"))

_abi = runpy.run_path(str(HERE / "abi.py"))

# The shared-memory structs and enums come from abi.py; the loops' contexts and the functions
# Python calls from hotpath.h, which hotpath.c includes: one declaration of each, which the
# compiler checks the wrappers against. cdef takes no preprocessor lines but its own defines.
HEADER = "\n".join(
    line for line in (HERE / "hotpath.h").read_text().splitlines() if not line.startswith("#")
)
CDEF = HEADER + "\n#define VMS_SOURCE_DIGEST ...\n"

ffibuilder = cffi.FFI()
ffibuilder.cdef(_abi["cdef"]() + CDEF)
ffibuilder.set_source(
    "vmsuper.shared._hotpath",
    # One translation unit: the generated wrappers see hotpath.c's own definitions.
    f"#define VMS_SOURCE_DIGEST {_source['digest'](HERE)}ULL\n"
    '#include "hotpath.c"\n#include "seqlock.c"\n',
    include_dirs=[str(HERE)],
    depends=[str(HERE / name) for name in _source["SOURCES"]],
    extra_compile_args=[
        "-O2",
        "-std=gnu11",
        "-Wall",
        # What cffi's checks of a declaration against a definition turn into: errors.
        "-Werror=incompatible-pointer-types",
        "-Werror=int-conversion",
        "-Werror=implicit-function-declaration",
        "-Werror=discarded-qualifiers",
    ],
)
