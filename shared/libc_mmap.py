"""`mmap` and `munmap` from libc, declared once with their types.

Python's `mmap` module maps whole objects at addresses of its choosing; vmsuper also needs a
memfd mapped at a page offset for KVM (`workers/vm_objects.py`) and pages replaced in place at
a fixed address (`SharedRegion.confine_to`).
"""

from __future__ import annotations

import ctypes
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

mmap = _libc.mmap
mmap.restype = ctypes.c_void_p
mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]

munmap = _libc.munmap
munmap.restype = ctypes.c_int
munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

MAP_FAILED: Final = ctypes.c_void_p(-1).value
"""What `mmap` returns on failure (then `ctypes.get_errno()` says why)."""
