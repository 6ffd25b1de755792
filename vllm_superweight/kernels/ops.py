"""Torch custom ops wrapping the Triton kernels (CUDA), so that they are opaque, graph-safe nodes inside
``torch.compile(fullgraph=True)`` and CUDA-graph capture.

* ``torch.ops.superweight.sparse_correction_(y, x, <8 layout tensors>, nnz) -> ()``  mutates ``y`` (the Triton
  kernel, or with ``SUPERWEIGHT_SPARSE_PANEL`` the shared-memory CUDA kernel of ``cuda_sell`` where it applies);
* ``torch.ops.superweight.int8_quant_outlier_split(x, idx?, mask?, per_token) -> (xq, scales, x_out)``;
* ``torch.ops.superweight.int8_quant_outlier_split_azp(x, idx, mask?) -> (xq, scales, x_out, azp)`` (per token);
* ``torch.ops.superweight.w8a8_mm(x, bias?, n, key) -> y``: the W8A8 layer registered under ``key``
  (``kernels.linear.w8a8.CutlassSplitInt8Kernel``), our Triton GEMM or CUTLASS chosen from x's token count;
* ``torch.ops.superweight.w8a8_mm_q(xq, scales, x_out?, azp?, bias?, n, out_dtype, key) -> y``: the same layer and
  dispatch on operands the compiled graph already split (``SUPERWEIGHT_W8A8_GRAPH_SPLIT``);
* ``torch.ops.superweight.w4_dual_mm(x, bias?, n, key) -> y``: the W4A16 GEMM of the layer registered under
  ``key`` (``kernels.linear.weight_only.DualMarlinMacheteKernel``), Marlin or Machete chosen from x's token count
  at run time.

Both have fake (meta) implementations. Registration uses vLLM's ``direct_register_custom_op`` when vLLM is
already imported (the plugin), otherwise plain ``torch.library`` (same effect; keeps the converter and the tests
free of a vLLM import). Registration touches no CUDA state (safe before vLLM forks its workers). The op bodies
only read tensor shapes on the host: no ``.item()``, no syncs, no data-dependent output shapes.
"""

import sys

import torch

NAMESPACE = "superweight"
_LIB: torch.library.Library | None = None
TRITON_OK = True
try:
    from . import triton_act_quant, triton_int8_mm, triton_sparse  # noqa: F401
except Exception:  # pragma: no cover - no triton in this environment
    TRITON_OK = False


def _sparse_impl(
    y: torch.Tensor,
    x: torch.Tensor,
    ell_cols: torch.Tensor,
    ell_vals: torch.Tensor,
    ell_rb: torch.Tensor,
    hrows: torch.Tensor,
    hptr: torch.Tensor,
    hcols: torch.Tensor,
    hvals: torch.Tensor,
    ucols: torch.Tensor,
    nnz: int,
) -> None:
    from . import cuda_sell
    from .sparse_layout import marker_dtype

    pack = marker_dtype(ell_vals)
    if pack is not None and cuda_sell.takes(y, x, ell_cols, pack):  # SUPERWEIGHT_SPARSE_PANEL (opt-in)
        if cuda_sell.sell_panel_(y, x, ell_cols, ell_rb, hrows, hptr, hcols, pack):
            return
    triton_sparse.sparse_correction_(y, x, ell_cols, ell_vals, ell_rb, hrows, hptr, hcols, hvals, ucols, nnz)


def _sparse_fake(
    y: torch.Tensor,
    x: torch.Tensor,
    ell_cols: torch.Tensor,
    ell_vals: torch.Tensor,
    ell_rb: torch.Tensor,
    hrows: torch.Tensor,
    hptr: torch.Tensor,
    hcols: torch.Tensor,
    hvals: torch.Tensor,
    ucols: torch.Tensor,
    nnz: int,
) -> None:
    return None


def _split_impl(
    x: torch.Tensor, outlier_idx: torch.Tensor | None, outlier_mask: torch.Tensor | None, per_token: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.stride(1) != 1:
        x = x.contiguous()
    return triton_act_quant.int8_quant_outlier_split(x, outlier_idx, per_token, outlier_mask)


def _split_fake(
    x: torch.Tensor, outlier_idx: torch.Tensor | None, outlier_mask: torch.Tensor | None, per_token: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    s = 0 if outlier_idx is None else outlier_idx.shape[0]
    xq = x.new_empty((m, k), dtype=torch.int8)
    scales = x.new_empty((m, 1) if per_token else (1, 1), dtype=torch.float32)
    xo = x.new_empty((m, s))
    return xq, scales, xo


def _split_azp_impl(
    x: torch.Tensor, outlier_idx: torch.Tensor, outlier_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.stride(1) != 1:
        x = x.contiguous()
    return triton_act_quant.int8_quant_outlier_split(x, outlier_idx, True, outlier_mask, azp=True)


def _split_azp_fake(
    x: torch.Tensor, outlier_idx: torch.Tensor, outlier_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xq, scales, xo = _split_fake(x, outlier_idx, outlier_mask, True)
    return xq, scales, xo, x.new_empty((x.shape[0],), dtype=torch.int32)


def _dual_impl(x: torch.Tensor, bias: torch.Tensor | None, n: int, key: str) -> torch.Tensor:
    from .linear import weight_only

    return weight_only.dual_mm_impl(x, bias, n, key)


def _mm_fake(x: torch.Tensor, bias: torch.Tensor | None, n: int, key: str) -> torch.Tensor:
    """The fake of both keyed GEMM ops (``w4_dual_mm``, ``w8a8_mm``): y [M, n] in x's dtype."""
    return x.new_empty((x.shape[0], n))


def _w8a8_impl(x: torch.Tensor, bias: torch.Tensor | None, n: int, key: str) -> torch.Tensor:
    from .linear import w8a8

    return w8a8.registered("w8a8_mm", key).run(x, bias)


def _w8a8_q_impl(
    xq: torch.Tensor,
    xs: torch.Tensor,
    xo: torch.Tensor | None,
    azp: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
    out_dtype: torch.dtype,
    key: str,
) -> torch.Tensor:
    from .linear import w8a8

    return w8a8.registered("w8a8_mm_q", key).run_q(xq, xs, xo, azp, bias, out_dtype)


def _w8a8_q_fake(
    xq: torch.Tensor,
    xs: torch.Tensor,
    xo: torch.Tensor | None,
    azp: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
    out_dtype: torch.dtype,
    key: str,
) -> torch.Tensor:
    return xq.new_empty((xq.shape[0], n), dtype=out_dtype)


def _register_one(lib, name, fn, mutates, fake) -> None:
    if "vllm" in sys.modules:
        try:
            from vllm.utils.torch_utils import direct_register_custom_op

            direct_register_custom_op(
                name, fn, mutates_args=mutates, fake_impl=fake, target_lib=lib, dispatch_key="CUDA"
            )
            return
        except ImportError:
            pass
    from torch._library.infer_schema import infer_schema

    lib.define(name + infer_schema(fn, mutates_args=mutates))
    lib.impl(name, fn, "CUDA")
    lib._register_fake(name, fake)


def register() -> bool:
    """Define the ops once per process (idempotent). Returns False where Triton is unavailable."""
    global _LIB
    if not TRITON_OK:
        return False
    if _LIB is not None:
        return True
    try:  # already defined in this process (e.g. the module was re-imported)
        torch.ops.superweight.sparse_correction_.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    _register_one(lib, "sparse_correction_", _sparse_impl, ["y"], _sparse_fake)
    _register_one(lib, "int8_quant_outlier_split", _split_impl, [], _split_fake)
    _register_one(lib, "int8_quant_outlier_split_azp", _split_azp_impl, [], _split_azp_fake)
    _register_one(lib, "w4_dual_mm", _dual_impl, [], _mm_fake)
    _register_one(lib, "w8a8_mm", _w8a8_impl, [], _mm_fake)
    _register_one(lib, "w8a8_mm_q", _w8a8_q_impl, [], _w8a8_q_fake)
    _LIB = lib
    return True


register()
