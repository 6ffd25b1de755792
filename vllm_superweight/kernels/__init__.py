"""Kernels of the superweight_rtn serving path (public API used by ``vllm_superweight.vllm_plugin``).

    prepare_sparse(rows, cols, vals, out_features, in_features, device) -> dict[str, Tensor]
    sparse_correction(y, x, sp) -> Tensor                      # y + S x^T (in place on CUDA)
    gemm_then_correction(gemm, x, sp, n) -> Tensor             # gemm() + S x^T (optionally beside the GEMM)
    int8_quant_outlier_split(x, outlier_idx, per_token=True)  -> (xq, scales, x_out)
    int8_quant_outlier_split_azp(x, outlier_idx, mask)        -> (xq, scales, x_out, azp)  # per token

Extras (optional for the plugin):

    prepare_outliers(idx, in_features, device) -> {"idx", "mask"}   # pass mask= to the split for speed
    outlier_columns_as_entries(w_cols, idx) -> (rows, cols, vals)   # fold the W8A8 side product into sp
    add_outlier_side_product(y, x_out, w_out_t) -> Tensor           # y + x_out @ w_out_t, Inductor-fusible

CUDA: Triton kernels behind torch custom ops (``torch.ops.superweight.*``, fake impls; torch.compile and CUDA
graph safe). CPU: vectorized torch (index_select / index_add_ in float32). Importing this package needs torch
only (Triton optional, vLLM not needed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import envs
from . import ops as _ops
from .sparse_layout import (
    build_coo,
    build_sell,
    coo_correction_torch,
    int8_split_azp_torch,
    int8_split_torch,
    interpreting,
    layout_stats,
    sell_correction_torch,
)

__all__ = [
    "prepare_sparse",
    "sparse_correction",
    "gemm_then_correction",
    "int8_quant_outlier_split",
    "int8_quant_outlier_split_azp",
    "prepare_outliers",
    "outlier_columns_as_entries",
    "add_outlier_side_product",
    "layout_stats",
]


def _is_cuda_device(device) -> bool:
    return torch.device(device).type == "cuda"


def prepare_sparse(
    rows: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    out_features: int,
    in_features: int,
    device,
    *,
    layout: str | None = None,
    lanes: int = 32,
    depth: int | None = None,
    pack: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Load-time preprocessing of one Linear's held-out entries ``(rows[i], cols[i], vals[i])``.

    Returns fixed-shape tensors for the plugin to register on the layer. ``layout``: ``"sell"`` (the Triton
    kernel's layout; default on CUDA) or ``"coo"`` (default elsewhere). Values are kept in float32. Duplicate
    coordinates are allowed and summed. Raises ValueError on out-of-range indices or non-finite values.
    ``pack`` (bf16 / fp16, SELL only, K <= 65536): 4-byte slots (value bits | 16-bit column) instead of 8; a value
    the dtype cannot hold exactly becomes 2-3 exact terms at the same position.
    """
    layout = layout or ("sell" if _is_cuda_device(device) and _ops.TRITON_OK else "coo")
    if layout == "sell" and pack is not None:
        from .triton_w4 import _entries  # values the dtype cannot hold -> 2-3 exact terms at the same position

        r, c, v = _entries(rows, cols, vals, int(out_features), int(in_features), pack)
        sp = build_sell(r, c, v.float(), int(out_features), int(in_features), device, lanes, depth, pack=pack)
        if _is_cuda_device(device) and lanes == 32:  # SUPERWEIGHT_SPARSE_PANEL: its kernels built now, not in a graph
            from . import cuda_sell

            cuda_sell.prepare(int(in_features), pack, pack, torch.device(device))
        return sp
    if layout == "sell":
        return build_sell(rows, cols, vals, int(out_features), int(in_features), device, lanes=lanes, depth=depth)
    if layout == "coo":
        return build_coo(rows, cols, vals, int(out_features), int(in_features), device)
    raise ValueError(f"unknown sparse layout {layout!r}")


#: the SELL layout's tensors, in the order the correction kernels take them (after y and x)
_SELL_KEYS = ("ell_cols", "ell_vals", "ell_rb", "hrows", "hptr", "hcols", "hvals", "ucols")


def sparse_correction(y: torch.Tensor, x: torch.Tensor, sp: dict[str, torch.Tensor], pdl: bool = False) -> torch.Tensor:
    """``y + S x^T`` for y [M, N], x [M, K]: fp32 accumulation, one rounding into y's dtype.

    CUDA + SELL layout: in place (returns ``y``). Otherwise returns a new tensor. ``pdl``: the Triton kernel launched
    as a programmatic dependent of the kernel just before it on the stream, which must be the one writing y (its
    loads and FMAs overlap that kernel once it lets dependents launch; it waits before reading y). Called directly,
    not through the custom op: for callers already inside an opaque op (the kernel classes' dispatch), where the
    launch must follow their GEMM's.
    """
    if "rows" in sp:
        return coo_correction_torch(y, x, sp)
    nnz = int(sp["nnz"].shape[0])  # a static shape: no device read
    if _ops.TRITON_OK and y.stride(1) == 1 and (y.is_cuda or interpreting()):
        parts: dict[str, Any] = {k: sp[k] for k in _SELL_KEYS}  # (named as the kernels' parameters)
        if y.is_cuda and not pdl:
            torch.ops.superweight.sparse_correction_(y, x, *parts.values(), nnz)
        else:  # PDL (inside an opaque op, right after the GEMM), or the Triton interpreter on CPU tensors (tests)
            _ops.triton_sparse.sparse_correction_(y, x, **parts, nnz=nnz, pdl=pdl and y.is_cuda)
        return y
    return sell_correction_torch(y, x, sp)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per CUDA device for the overlapped correction (created once, reused by every layer)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def gemm_then_correction(
    gemm: Callable[[], torch.Tensor],
    x: torch.Tensor,
    sp: dict[str, torch.Tensor],
    n: int,
    overlap: bool | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``gemm() + S x^T``, where ``gemm()`` returns y [M, n] for these x [M, K]. Default: ``sparse_correction`` on y
    after the GEMM. ``overlap`` (default: ``SUPERWEIGHT_SPARSE_OVERLAP``), on CUDA with the SELL layout: S x^T into
    a float32 buffer on a side stream forked from the current one before the GEMM is queued (so it reads x after
    x's writer) and joined after it, then one add into y: y + (S x^T in float32), rounded once, as the in-place
    kernel rounds. Legal under CUDA-graph capture (fork and join become graph edges) and inside torch.compile (this
    runs in opaque custom ops). The buffer is allocated on the current stream BEFORE the fork, so no memory the GEMM
    may still use is handed to the side stream (the side stream's own scratch comes from its own pool); after the
    add it returns to the current stream, whose later work waits for the side stream's (the join). ``pdl`` (without
    ``overlap``): the correction launched as a programmatic dependent of the GEMM (``sparse_correction``), for a
    GEMM that lets dependents launch early (the CUDA GEMV's ``trig`` plans)."""
    if overlap is None:
        overlap = envs.sparse_overlap()
    m = x.shape[0]
    if not (overlap and x.is_cuda and "rows" not in sp and _ops.TRITON_OK and m > 0):
        return sparse_correction(gemm(), x, sp, pdl=pdl)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    c = torch.empty(m, n, dtype=torch.float32, device=x.device)
    fork, join = torch.cuda.Event(), torch.cuda.Event()
    fork.record(main)
    y = gemm()  # queued first: the GEMM is the long pole, its blocks should not wait behind the correction's
    with torch.cuda.stream(side):  # the correction's scratch (x transposed) comes from the side stream's pool
        side.wait_event(fork)
        c.zero_()
        sparse_correction(c, x, sp)
        join.record(side)
    main.wait_event(join)
    return y.add_(c)


def int8_quant_outlier_split(
    x: torch.Tensor, outlier_idx: torch.Tensor | None, per_token: bool = True, outlier_mask: torch.Tensor | None = None
):
    """Dynamic symmetric int8 quantization of x [M, K] (16-bit) that skips the outlier channels.

    Returns ``(xq int8 [M, K] with the outlier channels 0, scales float32 [M, 1] (per token) or [1, 1],
    x_out [M, S] = x[:, outlier_idx] in x's dtype)``; scales = absmax / 127 over the non-outlier channels.
    ``outlier_mask`` (int8 [K], 1 on outlier channels; see ``prepare_outliers``) is an optional speed-up.
    """
    if outlier_idx is not None and outlier_idx.numel() == 0:
        outlier_idx = None
    if outlier_idx is None:
        outlier_mask = None
    if x.is_cuda and _ops.TRITON_OK:
        return torch.ops.superweight.int8_quant_outlier_split(x, outlier_idx, outlier_mask, per_token)
    if interpreting() and _ops.TRITON_OK:
        return _ops.triton_act_quant.int8_quant_outlier_split(x.contiguous(), outlier_idx, per_token, outlier_mask)
    return int8_split_torch(x, outlier_idx, per_token)


def int8_quant_outlier_split_azp(x: torch.Tensor, outlier_idx: torch.Tensor, outlier_mask: torch.Tensor | None = None):
    """Per-token ``int8_quant_outlier_split`` that also returns ``azp`` (int32 [M]): the first outlier channel
    ``outlier_idx[0]`` as an integer on the token's step, for ``cutlass_scaled_mm_azp`` (see
    ``sparse_layout.int8_split_azp_torch``, the reference). One kernel on CUDA, like the plain split."""
    if x.is_cuda and _ops.TRITON_OK:
        return torch.ops.superweight.int8_quant_outlier_split_azp(x, outlier_idx, outlier_mask)
    if interpreting() and _ops.TRITON_OK:
        return _ops.triton_act_quant.int8_quant_outlier_split(x.contiguous(), outlier_idx, True, outlier_mask, azp=True)
    return int8_split_azp_torch(x, outlier_idx)


def prepare_outliers(idx, in_features: int, device) -> dict[str, torch.Tensor]:
    """{"idx": int32 [S] sorted unique, "mask": int8 [K] (1 = outlier channel)} on ``device``."""
    idx = torch.unique(torch.as_tensor(idx).reshape(-1).to("cpu", torch.int64))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= in_features):
        raise ValueError(f"outlier channel outside [0, {in_features})")
    mask = torch.zeros(in_features, dtype=torch.int8)
    mask[idx] = 1
    return {"idx": idx.to(torch.int32).to(device), "mask": mask.to(device)}


def outlier_columns_as_entries(w_cols: torch.Tensor, idx: torch.Tensor):
    """Entries (rows, cols, vals) of the dense outlier columns: ``w_cols[:, s]`` is column ``idx[s]`` of W [N, K].

    Appending them to a layer's held-out entries turns the W8A8 side product ``x_out @ W[:, S]^T`` into part of
    the one sparse-correction launch (every row gains S slots: the SELL layout takes them at full efficiency).
    """
    n, s = w_cols.shape
    rows = torch.arange(n, device=w_cols.device).repeat_interleave(s)
    cols = torch.as_tensor(idx, device=w_cols.device).reshape(1, s).expand(n, s).reshape(-1)
    return rows, cols.long(), w_cols.reshape(-1).float()


def add_outlier_side_product(y: torch.Tensor, x_out: torch.Tensor, w_out_t: torch.Tensor) -> torch.Tensor:
    """``y + x_out @ w_out_t`` (y [M, N], x_out [M, S], w_out_t [S, N]) in float32 with one rounding.

    Written as S unrolled multiply-adds so that under torch.compile Inductor fuses it into y's consumer (no extra
    kernel, no extra pass over y); eagerly (S > 0) it is one addmm.
    """
    s = x_out.shape[1]
    if s == 0:
        return y
    if torch.compiler.is_compiling() and s <= 16:
        acc = y.float()
        for i in range(s):
            acc = acc + x_out[:, i : i + 1].float() * w_out_t[i : i + 1, :].float()
        return acc.to(y.dtype)
    return torch.addmm(y.float(), x_out.float(), w_out_t.float()).to(y.dtype)
