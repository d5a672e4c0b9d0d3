"""The one ELF field the installer rewrites: PT_INTERP, the dynamic loader the kernel maps for
an executable.

A bundled interpreter must run with its own loader (a glibc loader only works with the libc it
was built with), and the kernel only accepts an absolute PT_INTERP path, which depends on where
the copy is installed. The bundle reserves room for a long path at build time (patchelf), so
installing writes the real path into that room, NUL-padded: the kernel opens the string up to
its first NUL. No other byte of the file changes.
"""

from __future__ import annotations

import errno
import os
import struct

PT_INTERP = 3
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB = 2, 1
_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")      # Elf64_Ehdr
_PHDR = struct.Struct("<IIQQQQQQ")                # Elf64_Phdr


class ElfError(OSError):
    """Not an ELF64 little-endian executable with a PT_INTERP, or no room for the new path."""


def _interp_segment(f, path: str) -> tuple[int, int]:
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size or header[:4] != _ELF_MAGIC:
        raise ElfError(errno.ENOEXEC, "not an ELF file", path)
    if header[4] != _ELFCLASS64 or header[5] != _ELFDATA2LSB:
        raise ElfError(errno.ENOEXEC, "not a 64-bit little-endian ELF file", path)
    fields = _HEADER.unpack(header)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    for index in range(phnum):
        f.seek(phoff + index * phentsize)
        p_type, _, p_offset, _, _, p_filesz, _, _ = _PHDR.unpack(f.read(_PHDR.size))
        if p_type == PT_INTERP:
            return p_offset, p_filesz
    raise ElfError(errno.ENOEXEC, "no PT_INTERP (not a dynamically linked executable)", path)


def interpreter(path: str) -> str:
    """The loader *path* names (its PT_INTERP string)."""
    with open(path, "rb") as f:
        offset, size = _interp_segment(f, path)
        f.seek(offset)
        return f.read(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def set_interpreter(path: str, loader: str) -> None:
    """Write *loader* into *path*'s PT_INTERP in place; ElfError if it does not fit."""
    data = os.fsencode(loader)
    if not data.startswith(b"/") or b"\0" in data:
        raise ElfError(errno.EINVAL, f"loader path {loader!r} is not absolute", path)
    with open(path, "r+b") as f:
        offset, size = _interp_segment(f, path)
        if len(data) + 1 > size:
            raise ElfError(errno.ENAMETOOLONG, f"loader path {loader!r} is longer than the "
                           f"{size - 1} bytes the bundle reserved", path)
        f.seek(offset)
        f.write(data.ljust(size, b"\0"))
