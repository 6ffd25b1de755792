"""A CUDA cubin's ELF symbol table read with ``struct``, and Humming's two symbol lookups served from it.

Why (session 31, H200, ``benchmarks/diag/humming_startup.py``): vLLM's Humming backend prepares 92 kernels at each
7B layer shape's first batch and, for each, finds the kernel's mangled name by walking the cubin's ~1,600 symbols
with pyelftools (``humming.utils.jit.find_kernel_name_in_cubin``) -- about 0.25 s of pure-Python parsing a kernel,
under the GIL, so Humming's 16 build threads run it one at a time: 23-26 s a shape, the same with a warm kernel cache
(NVRTC was not the cost). Reading the section headers and the 24-byte symbol records with ``struct`` gives the same
answer in about a millisecond.

``install_humming_reader()`` replaces those two functions of ``humming.utils.jit`` (the module attribute Humming
calls them through) with ours -- on by default, ``SUPERWEIGHT_HUMMING_FAST_ELF=0`` keeps Humming's own. The first
lookup is answered both ways and compared; a difference puts Humming's own functions back (and says so in the log),
so an ELF this reader misunderstands can cost time, never a wrong kernel name.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vllm.superweight_rtn")

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr: name type flags addr offset size link info addralign entsize
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: name info other shndx value size
SHT_SYMTAB, SHT_NOBITS, STT_FUNC = 2, 8, 2
SHN_XINDEX = 0xFFFF


@dataclass(frozen=True)
class Symbol:
    name: str
    type: int  # STT_* (the low nibble of st_info)
    shndx: int
    value: int
    size: int


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int


class CubinELF:
    """The parts of a 64-bit little-endian ELF file (what nvcc / NVRTC write) that symbol lookups need."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
            raise ValueError("not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise ValueError(f"not a 64-bit little-endian ELF (class {data[4]}, data {data[5]})")
        self.data = data
        h = _EHDR.unpack_from(data)
        shoff, shentsize, shnum, shstrndx = h[6], h[11], h[12], h[13]
        if shoff == 0:
            raise ValueError("ELF without section headers")
        if shentsize != _SHDR.size:
            raise ValueError(f"ELF section header size {shentsize}, expected {_SHDR.size}")
        if shoff + _SHDR.size > len(data):
            raise ValueError("ELF section headers run past the end of the file")
        first = _SHDR.unpack_from(data, shoff)
        if shnum == 0:  # extended numbering: the count lives in section 0's size
            shnum = first[5]
        if shstrndx == SHN_XINDEX:
            shstrndx = first[6]
        if shoff + shnum * _SHDR.size > len(data):
            raise ValueError("ELF section headers run past the end of the file")
        raw = [_SHDR.unpack_from(data, shoff + i * _SHDR.size) for i in range(shnum)]
        names = raw[shstrndx] if shstrndx < shnum else None
        self.sections = [
            _Section(
                name=self._cstr(names[4] + s[0]) if names is not None else "",
                type=s[1],
                offset=s[4],
                size=s[5],
                link=s[6],
            )
            for s in raw
        ]

    @classmethod
    def from_file(cls, path: str) -> CubinELF:
        with open(path, "rb") as f:
            return cls(f.read())

    def _cstr(self, at: int) -> str:
        end = self.data.find(b"\0", at)
        return self.data[at : end if end >= 0 else len(self.data)].decode("utf-8", "replace")

    def section_data(self, index: int) -> bytes:
        s = self.sections[index]
        if s.type == SHT_NOBITS:  # zero-initialised (.nv.global): no bytes in the file, zeros when loaded
            return bytes(s.size)
        return self.data[s.offset : s.offset + s.size]

    def symtab(self) -> _Section | None:
        """The ``.symtab`` section (by name, as Humming looks it up; else the first of type SHT_SYMTAB)."""
        by_name = [s for s in self.sections if s.name == ".symtab"]
        if by_name:
            return by_name[0]
        return next((s for s in self.sections if s.type == SHT_SYMTAB), None)

    def symbols(self, want: Callable[[int], bool] | None = None) -> Iterator[Symbol]:
        """The symbol table's entries in file order; ``want(type)`` filters before a name is decoded."""
        st = self.symtab()
        if st is None:
            return
        if not 0 <= st.link < len(self.sections):
            raise ValueError(f"symbol table links to section {st.link} of {len(self.sections)}")
        strtab = self.sections[st.link]
        end = st.offset + st.size - st.size % _SYM.size
        for name, info, _other, shndx, value, size in _SYM.iter_unpack(self.data[st.offset : end]):
            if want is None or want(info & 0xF):
                yield Symbol(self._cstr(strtab.offset + name), info & 0xF, shndx, value, size)


def find_kernel_name(path: str, func_keyword: str) -> str:
    """``humming.utils.jit.find_kernel_name_in_cubin``'s contract: the one function symbol whose mangled name starts
    ``_Z<digits><func_keyword>`` (the keyword read as a regular expression, as Humming does); AssertionError unless
    exactly one."""
    pattern = re.compile(f"^_Z\\d+{func_keyword}")
    found = [s.name for s in CubinELF.from_file(path).symbols(lambda t: t == STT_FUNC) if pattern.search(s.name)]
    assert len(found) == 1, f"{path}: {len(found)} function symbols match {func_keyword!r}: {found[:4]}"
    return found[0]


def read_symbol_value(path: str, symbol_name: str, default_value: Any = None) -> Any:
    """``humming.utils.jit.read_symbol_value``'s contract: the little-endian int32 stored at the first symbol of
    that name (``default_value`` where there is none)."""
    elf = CubinELF.from_file(path)
    sym = next((s for s in elf.symbols() if s.name == symbol_name), None)
    if sym is None:
        return default_value
    raw = elf.section_data(sym.shndx)[sym.value : sym.value + sym.size]
    return struct.unpack("<i", raw)[0]


class _Checked:
    """One of Humming's lookups served by ours, the first answer compared with Humming's own (under a lock: its
    build threads call at once); on a difference -- or our reader raising where Humming's does not -- Humming's own
    function goes back on its module and serves from then on."""

    def __init__(self, module: Any, attr: str, ours: Callable, theirs: Callable) -> None:
        self.module, self.attr, self.ours, self.theirs = module, attr, ours, theirs
        self.state = "unchecked"  # -> "ours" | "theirs"
        self.lock = threading.Lock()
        self.sw_fast_elf = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.state == "ours":
            return self.ours(*args, **kwargs)
        if self.state == "theirs":
            return self.theirs(*args, **kwargs)
        with self.lock:
            if self.state != "unchecked":
                return self(*args, **kwargs)
            expected = self.theirs(*args, **kwargs)  # Humming's answer (or its exception) stands this once
            try:
                got: Any = self.ours(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (any failure of ours: Humming's reader from now on)
                got = e
            if type(got) is type(expected) and got == expected:
                self.state = "ours"
            else:
                self.state = "theirs"
                setattr(self.module, self.attr, self.theirs)
                log.warning(
                    "superweight_rtn: our cubin reader's %s answered %r where Humming's says %r (%s); Humming's own "
                    "reader is back",
                    self.attr,
                    got,
                    expected,
                    args[:2],
                )
            return expected


def install_humming_reader() -> bool:
    """Serve ``humming.utils.jit``'s two cubin symbol lookups from ``CubinELF`` (see the module docstring); True
    where ours are in place (now or before), False where off (``SUPERWEIGHT_HUMMING_FAST_ELF=0``), where Humming
    does not import or no longer has those functions."""
    from .. import envs

    if not envs.humming_fast_elf():
        return False
    try:
        import humming.utils.jit as jit
    except Exception:  # noqa: BLE001  (humming-kernels absent or broken: nothing to speed up)
        return False
    pairs = (("find_kernel_name_in_cubin", find_kernel_name), ("read_symbol_value", read_symbol_value))
    if not all(callable(getattr(jit, name, None)) for name, _ in pairs):
        return False
    fresh = False
    for name, ours in pairs:
        current = getattr(jit, name)
        if not getattr(current, "sw_fast_elf", False):
            setattr(jit, name, _Checked(jit, name, ours, current))
            fresh = True
    if fresh:
        log.info(
            "superweight_rtn: Humming's cubin symbol lookups read with struct (pyelftools cost ~0.25 s a kernel, "
            "23-26 s a 7B layer shape on an H200); SUPERWEIGHT_HUMMING_FAST_ELF=0 keeps Humming's own"
        )
    return True
