"""kernels/cubin.py: the struct ELF reader on real NVRTC cubins (no GPU) against known answers and pyelftools, and
its installation over Humming's lookups (a stand-in ``humming.utils.jit`` module: the real package needs CUDA)."""

from __future__ import annotations

import logging
import re
import struct
import sys
import types

import pytest

from vllm_superweight.kernels import cubin as C

SRC = r"""
extern "C" __device__ int sw_cfg_answer = 1234567;
extern "C" __device__ int sw_cfg_negative = -42;
extern "C" __device__ int sw_zero_init;  // zero-initialised: a NOBITS section (.nv.global), no bytes in the file
template <int N> __global__ void humming(int* out) {
  out[threadIdx.x] = N + sw_cfg_answer + sw_cfg_negative + sw_zero_init;
  sw_zero_init = out[0];
}
template __global__ void humming<3>(int*);
__global__ void hummingbird(float* out) { out[0] = 1.f; }
__global__ void other_kernel(int* out) { out[0] = 2; }
namespace ns { __global__ void humming_in_ns(int* out) { out[0] = 3; } }
"""


def _cubin(tmp_path, arch="90", src=SRC):
    from tests.test_cuda_marlin_gemv import _nvrtc_or_skip
    from vllm_superweight.kernels import cuda_marlin_gemv as CG

    data = CG.nvrtc_cubin(src, arch, _nvrtc_or_skip())
    path = tmp_path / f"k{arch}.cubin"
    path.write_bytes(data)
    return str(path)


def _elftools_find(path, keyword):
    """Humming 0.1.10's find_kernel_name_in_cubin, restated on pyelftools (what our reader must agree with)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        names = [
            s.name
            for s in symtab.iter_symbols()
            if s["st_info"]["type"] == "STT_FUNC" and re.findall(f"^_Z\\d+{keyword}", s.name)
        ]
    assert len(names) == 1, names
    return names[0]


def _elftools_value(path, name, default=None):
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name(name)
        if sym is None:
            return default
        sym = sym[0]
        raw = elf.get_section(sym["st_shndx"]).data()[sym["st_value"] : sym["st_value"] + sym["st_size"]]
        return struct.unpack("<i", raw)[0]


@pytest.mark.parametrize("arch", ["90", "80"])
def test_reader_finds_the_kernel_and_reads_values(tmp_path, arch):
    path = _cubin(tmp_path, arch)
    # Humming's pattern is a prefix: "humming" also matches hummingbird (not ns::humming_in_ns) -> two, refused
    with pytest.raises(AssertionError, match="2 function symbols"):
        C.find_kernel_name(path, "humming")
    assert C.find_kernel_name(path, "hummingI") == "_Z7hummingILi3EEvPi"  # the template instance
    assert C.find_kernel_name(path, "other_kernel") == "_Z12other_kernelPi"
    assert C.read_symbol_value(path, "sw_cfg_answer") == 1234567
    assert C.read_symbol_value(path, "sw_cfg_negative") == -42
    assert C.read_symbol_value(path, "no_such_symbol", default_value=7) == 7
    # a zero-initialised value lives in a NOBITS section: zeros, as pyelftools (and Humming) read it -- Humming's
    # cubins hold ~70 such config symbols (found comparing both readers on a real Humming sm_90a cubin, s31)
    zero = next(s for s in C.CubinELF.from_file(path).symbols() if s.name == "sw_zero_init")
    assert C.CubinELF.from_file(path).sections[zero.shndx].type == C.SHT_NOBITS
    assert C.read_symbol_value(path, "sw_zero_init", default_value=7) == 0
    with pytest.raises(AssertionError, match="0 function symbols"):
        C.find_kernel_name(path, "absent_kernel")
    elf = C.CubinELF.from_file(path)
    funcs = {s.name for s in elf.symbols(lambda t: t == C.STT_FUNC)}
    assert {"_Z12other_kernelPi", "_Z11hummingbirdPf"} <= funcs and "sw_cfg_answer" not in funcs


def test_reader_agrees_with_pyelftools(tmp_path):
    pytest.importorskip("elftools")
    # a cubin with many symbols, like Humming's (~1,600 a kernel): 300 kernels and 300 device ints
    many = "".join(f'extern "C" __device__ int v{i} = {i * 7919 - 5};\n' for i in range(300))
    many += "".join(f"__global__ void kern{i:03d}(int* o) {{ o[0] = v{i}; }}\n" for i in range(300))
    for path in (_cubin(tmp_path, "90"), _cubin(tmp_path, "80", SRC + many)):
        elf = C.CubinELF.from_file(path)
        funcs = [s.name[2:].lstrip("0123456789") for s in elf.symbols(lambda t: t == C.STT_FUNC)]
        for kw in [*sorted({f.split("P")[0] for f in funcs if f.startswith(("kern", "other"))})[:40], "hummingI"]:
            assert C.find_kernel_name(path, kw) == _elftools_find(path, kw), kw
        for name in ["sw_cfg_answer", "sw_cfg_negative", "sw_zero_init", "v0", "v123", "v299", "absent"]:
            assert C.read_symbol_value(path, name, -1) == _elftools_value(path, name, -1), name
    assert C.read_symbol_value(path, "v299") == 299 * 7919 - 5


def test_reader_refuses_what_is_not_a_64_bit_elf(tmp_path):
    with pytest.raises(ValueError, match="not an ELF"):
        C.CubinELF(b"MZ" + b"\0" * 100)
    path = _cubin(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[4] = 1  # ELFCLASS32
    with pytest.raises(ValueError, match="64-bit"):
        C.CubinELF(bytes(data))
    data[4] = 2
    struct.pack_into("<Q", data, 40, len(data) - 8)  # section headers past the end of the file
    with pytest.raises(ValueError, match="past the end"):
        C.CubinELF(bytes(data))


@pytest.fixture
def fake_humming(monkeypatch):
    """A stand-in ``humming.utils.jit`` whose lookups count their calls (Humming's own functions' shapes)."""
    jit = types.ModuleType("humming.utils.jit")
    calls = {"find": 0, "read": 0}

    def find_kernel_name_in_cubin(filename, func_keyword):
        calls["find"] += 1
        return _elftools_find(filename, func_keyword)

    def read_symbol_value(filename, symbol_name, default_value=None):
        calls["read"] += 1
        return _elftools_value(filename, symbol_name, default_value)

    jit.find_kernel_name_in_cubin, jit.read_symbol_value = find_kernel_name_in_cubin, read_symbol_value
    for name, mod in [("humming", types.ModuleType("humming")), ("humming.utils", types.ModuleType("humming.utils"))]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "humming.utils.jit", jit)
    sys.modules["humming"].utils = sys.modules["humming.utils"]  # type: ignore[attr-defined]
    sys.modules["humming.utils"].jit = jit  # type: ignore[attr-defined]
    monkeypatch.delenv("SUPERWEIGHT_HUMMING_FAST_ELF", raising=False)
    return jit, calls


def test_install_checks_the_first_answer_then_serves_alone(tmp_path, fake_humming, caplog):
    pytest.importorskip("elftools")
    jit, calls = fake_humming
    path = _cubin(tmp_path)
    with caplog.at_level(logging.INFO, logger="vllm.superweight_rtn"):
        assert C.install_humming_reader() and C.install_humming_reader()  # idempotent: wrapped once, logged once
    assert sum("read with struct" in r.message for r in caplog.records) == 1
    assert jit.find_kernel_name_in_cubin.sw_fast_elf and jit.read_symbol_value.sw_fast_elf
    for _ in range(3):
        assert jit.find_kernel_name_in_cubin(path, "hummingI") == "_Z7hummingILi3EEvPi"
        assert jit.read_symbol_value(path, "sw_cfg_answer") == 1234567
    assert calls == {"find": 1, "read": 1}  # Humming's own functions ran once each: the check
    assert jit.find_kernel_name_in_cubin.state == jit.read_symbol_value.state == "ours"


def test_install_gives_humming_its_reader_back_on_a_difference(tmp_path, fake_humming, monkeypatch, caplog):
    pytest.importorskip("elftools")
    jit, calls = fake_humming
    theirs, theirs_read = jit.find_kernel_name_in_cubin, jit.read_symbol_value
    path = _cubin(tmp_path)
    monkeypatch.setattr(C, "find_kernel_name", lambda p, k: "_Z3bad")  # a reader that misreads
    assert C.install_humming_reader()
    with caplog.at_level(logging.WARNING, logger="vllm.superweight_rtn"):
        assert jit.find_kernel_name_in_cubin(path, "hummingI") == "_Z7hummingILi3EEvPi"  # Humming's answer
    assert jit.find_kernel_name_in_cubin is theirs  # put back on the module
    assert any("Humming's own reader is back" in r.message for r in caplog.records)
    assert jit.find_kernel_name_in_cubin(path, "other_kernel") == "_Z12other_kernelPi" and calls["find"] == 2
    # a reader that raises where Humming's answers: the same
    monkeypatch.setattr(C, "read_symbol_value", lambda *a, **k: 1 / 0)
    jit.read_symbol_value = theirs_read  # Humming's own again, then a fresh install over it
    C.install_humming_reader()
    assert jit.read_symbol_value.sw_fast_elf
    assert jit.read_symbol_value(path, "sw_cfg_answer") == 1234567 and jit.read_symbol_value is theirs_read


def test_install_is_off_by_knob_or_without_humming(fake_humming, monkeypatch):
    jit, _ = fake_humming
    monkeypatch.setenv("SUPERWEIGHT_HUMMING_FAST_ELF", "0")
    before = jit.find_kernel_name_in_cubin
    assert not C.install_humming_reader() and jit.find_kernel_name_in_cubin is before
    monkeypatch.delenv("SUPERWEIGHT_HUMMING_FAST_ELF")
    del jit.read_symbol_value  # a Humming without one of the two lookups: left alone
    assert not C.install_humming_reader() and jit.find_kernel_name_in_cubin is before
    monkeypatch.setitem(sys.modules, "humming.utils.jit", None)  # not importable
    assert not C.install_humming_reader()
