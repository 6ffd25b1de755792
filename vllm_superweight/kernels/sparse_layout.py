"""Load-time layout of the held-out (sparse) weights of one Linear, and the plain-torch corrections.

The correction is ``y[:, r] += v * x[:, c]`` for every held-out entry ``(r, c, v)`` (super weights, the bulk
``--holdout`` weights, and optionally the dense outlier-channel columns of the W8A8 scheme).

Two layouts, built once at load time (host code, no GPU needed):

* ``coo`` (CPU serving): ``rows``/``cols`` int64 and ``vals`` float32, sorted by (row, col). Applied with
  ``index_select`` + ``index_add_`` in float32 (vectorized, legal under torch.compile).

* ``sell`` (CUDA, the Triton kernel): a *sliced ELL* over blocks of ``C`` consecutive output rows ("slices").
  Inside a slice every lane is one row; the row's entries occupy slots ``0..len-1`` of that lane and the slice is
  padded to a uniform depth ``L`` with the sentinel column ``-1`` (value 0). Storage is ``[n_slices, L, C]``
  (slot-major, lane-minor) so one slot of a slice is one coalesced 128-byte load. Only row blocks holding entries
  get a slice (``rb`` maps slice -> row block), except in the packed form (``pack=``), where every block has one
  (dense: the GEMV over Marlin's layout addresses a row's slots without a lookup). Rows longer than ``L`` ("heavy"
  rows: e.g. an outlier row held out almost entirely) are kept in a separate CSR (``hrows``/``hptr``/``hcols``/
  ``hvals``) and get one program each. Every output row is owned by exactly one program: no atomics, a fixed
  fp32 summation order (deterministic), one rounding into ``y``. ``ucols`` (the distinct columns) drives the
  large-M path, which first transposes only those columns of ``x``.

All sizes the kernels need are tensor *shapes* (``L``, ``C``, ``n_slices``, ``H``, ``U``), never values, so the
CUDA op reads no device memory on the host: no syncs, CUDA-graph and torch.compile safe.
"""

from __future__ import annotations

import os

import torch

DEFAULT_LANES = 32


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``: the tests run the Triton kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


COO_KEYS = ("rows", "cols", "vals")
SELL_KEYS = ("ell_cols", "ell_vals", "ell_rb", "hrows", "hptr", "hcols", "hvals", "ucols", "nnz")


def _validate(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int, k: int):
    rows = torch.as_tensor(rows).reshape(-1).to("cpu", torch.int64)
    cols = torch.as_tensor(cols).reshape(-1).to("cpu", torch.int64)
    vals = torch.as_tensor(vals).reshape(-1).to("cpu")
    if not (rows.numel() == cols.numel() == vals.numel()):
        raise ValueError(f"sparse rows/cols/vals differ in length: {rows.numel()}, {cols.numel()}, {vals.numel()}")
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= n:
            raise ValueError(f"sparse row index outside [0, {n}): {int(rows.min())}..{int(rows.max())}")
        if int(cols.min()) < 0 or int(cols.max()) >= k:
            raise ValueError(f"sparse column index outside [0, {k}): {int(cols.min())}..{int(cols.max())}")
    if not vals.is_floating_point():
        vals = vals.float()
    vals = vals.float()
    if not torch.isfinite(vals).all():
        raise ValueError("sparse values hold NaN/Inf")
    if max(n, k) >= 2**31 - 1:
        raise ValueError("matrix too large for int32 indices")
    # (row, col) order; a stable sort keeps duplicates (they are summed) in input order -> deterministic
    order = torch.argsort(rows * k + cols, stable=True)
    return rows[order], cols[order], vals[order]


def build_coo(rows, cols, vals, n: int, k: int, device) -> dict[str, torch.Tensor]:
    r, c, v = _validate(rows, cols, vals, n, k)
    return {"rows": r.to(device), "cols": c.to(device), "vals": v.to(device)}


def choose_depth(counts: torch.Tensor, lanes: int = DEFAULT_LANES, heavy_cost: float | None = None) -> int:
    """Slice depth L minimizing ``padded light slots + heavy entries + heavy_cost * heavy rows``.

    ``counts``: entries per output row. Raising L by one costs one slot in every lane of every non-empty slice;
    a row longer than L instead costs its entries plus ``heavy_cost`` (default: one slot-row, ``lanes``) for its
    own program. Uniform rows give L = their length and no heavy rows; a few very long rows go heavy.
    """
    counts = counts.to(torch.int64)
    nzr = counts[counts > 0]
    if nzr.numel() == 0:
        return 0
    heavy_cost = float(lanes if heavy_cost is None else heavy_cost)
    pad = (-counts.numel()) % lanes
    blocks = torch.cat([counts, counts.new_zeros(pad)]).reshape(-1, lanes)
    n_blocks = int((blocks.sum(1) > 0).sum())
    cmax = int(nzr.max())
    hist = torch.bincount(nzr, minlength=cmax + 1).double()  # hist[c] = rows with c entries
    c_idx = torch.arange(cmax + 1, dtype=torch.float64)
    # tails over c > L for L = 0..cmax
    rows_gt = hist.flip(0).cumsum(0).flip(0) - hist
    ents_gt = (hist * c_idx).flip(0).cumsum(0).flip(0) - hist * c_idx
    cost = n_blocks * lanes * c_idx + ents_gt + heavy_cost * rows_gt
    cost[0] = float("inf")  # L >= 1 whenever there are entries
    return int(torch.argmin(cost))


PACK_DTYPES = (torch.bfloat16, torch.float16)
PACK_MAX_K = 1 << 16  # a packed slot's column field is 16 bits


def pack_slots(cols: torch.Tensor, vals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed slots: ``value bits (dtype) << 16 | column`` as int32; empty slots (column -1) become 0."""
    bits = vals.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    word = (bits << 16) | cols.to(torch.int64).clamp_min(0)
    word = torch.where(cols >= 0, word, torch.zeros_like(word))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_slots(words: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns int64 with -1 for empty slots, values float32) of packed slots."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w >> 16).to(torch.int32).to(torch.int16)  # wraps to the 16-bit pattern
    vals = bits.view(dtype).float()
    cols = torch.where(w != 0, w & 0xFFFF, torch.full_like(w, -1))
    return cols, torch.where(w != 0, vals, torch.zeros_like(vals))


def marker_dtype(ell_vals: torch.Tensor) -> torch.dtype | None:
    """The value dtype of packed slots, read from a SELL layout's ``ell_vals`` (an empty marker of that dtype when
    the slots are packed; float32 values otherwise -> None). Shapes and dtypes only: no device read."""
    return ell_vals.dtype if ell_vals.numel() == 0 and ell_vals.dtype in PACK_DTYPES else None


def packed_dtype(sp: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The value dtype of a packed SELL layout, else None."""
    v = sp.get("ell_vals")
    return None if v is None else marker_dtype(v)


def build_sell(
    rows,
    cols,
    vals,
    n: int,
    k: int,
    device,
    lanes: int = DEFAULT_LANES,
    depth: int | None = None,
    pack: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The sliced-ELL + heavy-CSR layout described in the module docstring (tensors on ``device``).

    ``pack`` (bf16 / fp16): every slot is ONE int32, the value's bits in that dtype above a 16-bit column (K <=
    65536), 0 for an empty slot; ``ell_vals`` / ``hvals`` are then empty markers of that dtype, and the slices are
    dense (every 32-row block owns one, ``ell_rb`` = 0, 1, ...: the GEMV over Marlin's layout computes a slot's
    address from its row, without a lookup; at a 0.1 % hold-out every block holds entries anyway). Every value must be
    exact in ``pack`` (split a value the dtype cannot hold into exact terms at the same position first:
    ``prepare_sparse(..., pack=...)`` does); zero values are dropped (they add nothing)."""
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two, got {lanes}")
    r, c, v = _validate(rows, cols, vals, n, k)
    if pack is not None:
        if pack not in PACK_DTYPES:
            raise ValueError(f"packed slots hold bf16 or fp16 values, not {pack}")
        if k > PACK_MAX_K:
            raise ValueError(f"packed slots address K <= {PACK_MAX_K} columns, the layer has {k}")
        if not torch.equal(v.to(pack).float(), v):
            raise ValueError(f"a held-out value is not exact in {pack}: split it into exact terms first")
        keep = v != 0
        r, c, v = r[keep], c[keep], v[keep]
    nnz = r.numel()
    counts = torch.bincount(r, minlength=n) if nnz else torch.zeros(n, dtype=torch.int64)
    L = choose_depth(counts, lanes) if depth is None else int(depth)
    heavy_row = counts > L
    row_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(nnz, dtype=torch.int64) - row_start[r]  # position of each entry inside its row
    is_heavy = heavy_row[r]

    # light part: slices over row blocks that hold at least one light entry
    lr, lc, lv, ls = r[~is_heavy], c[~is_heavy], v[~is_heavy], slot[~is_heavy]
    if pack is not None:  # dense slices
        blocks = torch.arange(-(-n // lanes), dtype=torch.int64) if nnz else torch.zeros(0, dtype=torch.int64)
    else:
        blocks = torch.unique(lr // lanes) if lr.numel() else torch.zeros(0, dtype=torch.int64)
    n_slices = int(blocks.numel())
    sidx = torch.full((max(1, -(-n // lanes)),), -1, dtype=torch.int64)
    sidx[blocks] = torch.arange(n_slices)
    depth_eff = L if n_slices else 0
    ell_cols = torch.full((n_slices, depth_eff, lanes), -1, dtype=torch.int32)
    ell_vals = torch.zeros((n_slices, depth_eff, lanes), dtype=torch.float32)
    if lr.numel():
        pos = (sidx[lr // lanes] * depth_eff + ls) * lanes + (lr % lanes)
        ell_cols.view(-1)[pos] = lc.to(torch.int32)
        ell_vals.view(-1)[pos] = lv

    # heavy part: CSR over the heavy rows
    hr_ids = torch.nonzero(heavy_row).reshape(-1)
    hcnt = counts[hr_ids]
    hptr = torch.zeros(hr_ids.numel() + 1, dtype=torch.int64)
    hptr[1:] = torch.cumsum(hcnt, 0)
    hcols, hvals = c[is_heavy], v[is_heavy]  # already ordered by (row, col)

    ucols = torch.unique(c) if nnz else torch.zeros(0, dtype=torch.int64)
    if pack is not None:
        ell_cols, ell_vals = pack_slots(ell_cols, ell_vals, pack), torch.zeros(0, dtype=pack)
        hcols, hvals = pack_slots(hcols, hvals, pack), torch.zeros(0, dtype=pack)
    out = {
        "ell_cols": ell_cols,
        "ell_vals": ell_vals,
        "ell_rb": blocks.to(torch.int32),
        "hrows": hr_ids.to(torch.int32),
        "hptr": hptr.to(torch.int32),
        "hcols": hcols.to(torch.int32),
        "hvals": hvals.float(),
        "ucols": ucols.to(torch.int32),
        "nnz": torch.empty((nnz, 0), dtype=torch.int8),  # zero bytes; its shape carries nnz to the launcher
    }
    return {key: t.contiguous().to(device) for key, t in out.items()}


def layout_stats(sp: dict[str, torch.Tensor]) -> dict:
    """Sizes of a layout (for reports / benchmarks)."""
    if "ell_cols" in sp:
        s, depth, lanes = sp["ell_cols"].shape
        pk = packed_dtype(sp)
        light = int((sp["ell_cols"] != 0).sum()) if pk is not None else int((sp["ell_cols"] >= 0).sum())
        return {
            "layout": "sell" if pk is None else f"sell-packed-{str(pk).removeprefix('torch.')}",
            "nnz": int(sp["nnz"].shape[0]),
            "slices": s,
            "depth": depth,
            "lanes": lanes,
            "light_nnz": light,
            "heavy_rows": int(sp["hrows"].numel()),
            "heavy_nnz": int(sp["hcols"].numel()),
            "unique_cols": int(sp["ucols"].numel()),
            "padded_slots": s * depth * lanes,
            "bytes": sum(t.numel() * t.element_size() for t in sp.values()),
        }
    return {
        "layout": "coo",
        "nnz": int(sp["rows"].numel()),
        "bytes": sum(t.numel() * t.element_size() for t in sp.values()),
    }


# ------------------------------------------------------------------------------------------------------------
# plain-torch corrections (CPU serving path; also the reference for the Triton kernel's layout)
# ------------------------------------------------------------------------------------------------------------
def coo_correction_torch(y: torch.Tensor, x: torch.Tensor, sp: dict[str, torch.Tensor]) -> torch.Tensor:
    """y + S x^T with float32 accumulation and one rounding (returns a new tensor)."""
    contrib = x.index_select(1, sp["cols"]).float() * sp["vals"]
    acc = y.float().index_add_(1, sp["rows"], contrib)
    return acc.to(y.dtype)


def sell_correction_torch(y: torch.Tensor, x: torch.Tensor, sp: dict[str, torch.Tensor]) -> torch.Tensor:
    """Same result from the SELL layout (vectorized; used on CPU tensors and as the kernel's reference)."""
    m, n = y.shape
    acc = y.float()
    pk = packed_dtype(sp)
    if pk is not None:
        cols, ell_vals = unpack_slots(sp["ell_cols"], pk)
        hcols, hvals = unpack_slots(sp["hcols"], pk)
    else:
        cols, ell_vals, hcols, hvals = sp["ell_cols"], sp["ell_vals"], sp["hcols"], sp["hvals"]
    s, depth, lanes = cols.shape
    if s and depth:
        xg = x.index_select(1, cols.clamp_min(0).reshape(-1).long()).reshape(m, s, depth, lanes)
        part = (xg.float() * ell_vals).sum(2)  # padding slots carry value 0
        rows = (sp["ell_rb"].long()[:, None] * lanes + torch.arange(lanes, device=y.device)).reshape(-1)
        acc.index_add_(1, rows.clamp_max(n - 1), part.reshape(m, s * lanes))  # rows >= n only add zeros
    h = sp["hrows"].numel()
    if h:
        cnt = sp["hptr"][1:].long() - sp["hptr"][:-1].long()
        hr = torch.repeat_interleave(sp["hrows"].long(), cnt, output_size=hcols.numel())
        acc.index_add_(1, hr, x.index_select(1, hcols.long()).float() * hvals)
    return acc.to(y.dtype)


def int8_split_torch(x: torch.Tensor, outlier_idx: torch.Tensor | None, per_token: bool = True):
    """(xq int8 with outlier channels 0, scales float32 [M,1] or [1,1], x[:, outlier_idx]).

    Symmetric, scale = absmax / 127 over the non-outlier channels; q = round_half_even(x * 127 / absmax),
    clamped to [-128, 127]; an all-zero row gets scale 0 and q = 0.
    """
    m, k = x.shape
    xf = x.float()
    if outlier_idx is not None and outlier_idx.numel():
        idx = outlier_idx.long()
        xo = x.index_select(1, idx)
        xf = xf.index_fill(1, idx, 0.0)
    else:
        xo = x.new_empty((m, 0))
    amax = xf.abs().amax(dim=1, keepdim=True) if per_token else xf.abs().amax().reshape(1, 1)
    xq, scales, _ = _quantize_by_absmax(xf, amax)
    return xq, scales, xo


def _quantize_by_absmax(xf: torch.Tensor, amax: torch.Tensor):
    """(int8 round-half-even of ``xf * 127 / amax`` clamped to [-128, 127], scales ``amax / 127``, ``127 / amax``
    (0 where amax is 0)) -- the Triton split's arithmetic."""
    # tensor / tensor: an IEEE division (``127.0 / t`` may be computed as 127 * (1 / t) on CPU)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax.clamp_min(1e-30), torch.zeros_like(amax))
    xq = torch.round((xf * inv).clamp(-128.0, 127.0)).to(torch.int8)
    return xq, amax / torch.full_like(amax, 127.0), inv


#: bound of the per-token zero point (``int8_split_azp_torch``): 127 * AZP_MAX + K * 128 * 127 < 2**31 for
#: K <= AZP_K_MAX, so CUTLASS's int32 epilogue ``accum - azp * azp_adj`` cannot overflow
AZP_MAX = 1 << 22
AZP_K_MAX = 65536


def int8_split_azp_torch(x: torch.Tensor, outlier_idx: torch.Tensor):
    """Per-token ``int8_split_torch`` plus ``azp`` (int32 [M]): the first outlier channel on the token's own step,
    ``azp = -floor(x[:, idx[0]] / scale + 0.5)``, for vLLM's per-token zero-point epilogue (``cutlass_scaled_mm_azp``
    subtracts ``azp[m] * azp_adj[n]`` from the int32 accumulator, with ``azp_adj = W_int8[:, idx[0]]``). The
    token's absmax is raised to ``|x0| * 127 / AZP_MAX`` where the outlier would exceed AZP_MAX steps (or the rest
    is 0). Returns (xq, scales [M, 1], x[:, outlier_idx], azp)."""
    idx = outlier_idx.long()
    if idx.numel() == 0:
        raise ValueError("azp needs at least one outlier channel")
    xf = x.float().index_fill(1, idx, 0.0)
    x0 = x[:, idx[0]].float().unsqueeze(1)
    amax = torch.maximum(xf.abs().amax(dim=1, keepdim=True), x0.abs() * (127.0 / AZP_MAX))
    xq, scales, inv = _quantize_by_absmax(xf, amax)
    a = torch.floor(x0 * inv + 0.5).clamp(-float(AZP_MAX), float(AZP_MAX))
    return xq, scales, x.index_select(1, idx), (-a).reshape(-1).to(torch.int32)


def int8_split_fusable(
    x: torch.Tensor, outlier_idx: torch.Tensor | None, keep: torch.Tensor | None, azp: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The per-token split written for torch.compile: the same arithmetic as ``int8_split_torch`` (``azp``:
    ``int8_split_azp_torch``), with the outlier channels removed by a multiply with ``keep`` ([K], 0 on them, 1
    elsewhere) instead of ``index_fill`` -- only pointwise ops, one row reduction and a gather, so Inductor fuses
    it into the kernel that produces x (the residual-add RMSNorm before q/k/v and gate/up, SiLU * up before
    down_proj) instead of running it as its own pass over x. Returns (xq, scales [M, 1], x[:, outlier_idx] or
    None, azp int32 [M] or None); bitwise equal to the references wherever x is finite (``x * 0`` is a signed
    zero, which quantizes to 0 like the filled one)."""
    xf = x.float()
    xo = None
    if outlier_idx is not None and outlier_idx.numel():
        if keep is None:
            raise ValueError("outlier channels need their keep mask")
        xo = x.index_select(1, outlier_idx.long())
        xf = xf * keep.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    if not azp:
        xq, scales, _ = _quantize_by_absmax(xf, amax)
        return xq, scales, xo, None
    if xo is None:
        raise ValueError("azp needs at least one outlier channel")
    x0 = xo[:, :1].float()
    amax = torch.maximum(amax, x0.abs() * (127.0 / AZP_MAX))
    xq, scales, inv = _quantize_by_absmax(xf, amax)
    a = torch.floor(x0 * inv + 0.5).clamp(-float(AZP_MAX), float(AZP_MAX))
    return xq, scales, xo, (-a).reshape(-1).to(torch.int32)
