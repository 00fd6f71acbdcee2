"""What the page cache holds of a file (mincore(2)), for tests of the bulk loaders that
keep out of it."""
from __future__ import annotations

import ctypes
import mmap
import os


def resident_pages(path, end: int | None = None) -> tuple[int, int]:
    """(pages of `path` (its first `end` bytes) in the page cache, pages in all), by mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size if end is None else min(end, path.stat().st_size)
    if size <= 0:
        return 0, 0
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec), pages


def file_system(path) -> str:
    mounts = [line.split()[1:3] for line in open("/proc/self/mounts")]
    here = str(path.resolve())
    return max(((m, t) for m, t in mounts if here == m or here.startswith(m.rstrip("/") + "/")),
               key=lambda mt: len(mt[0]))[1]
