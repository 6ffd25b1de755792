"""Load-time transforms between the on-disk format and what vLLM's kernels take, and TP-aware sparse bookkeeping.

Each parameter the schemes register gets a loader closure (``wrap_loader``) that turns the checkpoint tensor of
ONE logical shard (q/k/v, gate/up, or the whole matrix) into the kernel layout **at full shard size**, then hands
it to the layer's own vLLM loader, which does the tensor-parallel narrowing and the placement inside fused
(qkv, gate_up) parameters. So all TP slicing is vLLM's; we only re-express blocks:

* ``weight_packed``  CT pack-quantized at ``bits`` -> CT pack-quantized at 4 bits (bits <= 4) or 8 bits
  (vLLM's uint4b8/uint4/uint8b128/uint8 types), or plain int8 for the W8A8 path;
* ``weight_scale`` / ``weight_zero_point``: compact block grid [N/R, K/G] -> one entry per output row [N, K/G];
* ``sparse_*`` / ``act_outlier_channels``: stashed per shard, then filtered/re-indexed for this rank in
  ``finalize_sparse`` (column-parallel: by output row window; row-parallel: by input column window, so a super
  weight of a row-parallel down_proj lives only on the rank owning its input column, before the all-reduce).
"""

from __future__ import annotations

import torch

from ..format import BlockLayout, FormatError
from ..quantize import pack_codes, unpack_codes

SHARD_INDEX = {"q": 0, "k": 1, "v": 2}


def kernel_bits(bits: int) -> int:
    """Bit width of the kernel's storage type for a checkpoint of ``bits`` (3-bit codes ride in 4-bit slots)."""
    return 4 if bits <= 4 else 8


def shard_rows(layer, shard_id) -> int:
    """Full (unsharded) number of output rows of one logical shard of ``layer``."""
    sizes = getattr(layer, "output_sizes", None)
    if shard_id is None or sizes is None:
        return int(layer.output_size)
    idx = SHARD_INDEX.get(shard_id, shard_id)
    return int(sizes[idx])


def qkv_shard_window(layer, shard_id: str) -> tuple[int, int]:
    """(offset, rows) of the q / k / v shard inside this rank's fused QKV output (from the layer's public head
    counts: ``num_heads`` / ``num_kv_heads`` are per rank in vLLM)."""
    hq, hkv = int(layer.num_heads), int(layer.num_kv_heads)
    hd = int(layer.head_size)
    vd = int(getattr(layer, "v_head_size", hd) or hd)
    return {"q": (0, hq * hd), "k": (hq * hd, hkv * hd), "v": ((hq + hkv) * hd, hkv * vd)}[shard_id]


def shard_offsets(layer, shard_id):
    """(offset of the shard in this rank's fused output, rows of the shard on this rank, first global row kept)."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    tp_rank, tp_size = int(layer.tp_rank), int(layer.tp_size)
    if isinstance(layer, QKVParallelLinear) and shard_id is not None:
        off, size = qkv_shard_window(layer, shard_id)
        replicas = int(getattr(layer, "num_kv_head_replicas", 1) or 1)
        rank = tp_rank if shard_id == "q" else tp_rank // replicas
        return off, size, size * rank
    if isinstance(layer, MergedColumnParallelLinear) and shard_id is not None:
        sizes = layer.output_sizes
        off = sum(sizes[:shard_id]) // tp_size
        size = sizes[shard_id] // tp_size
        return off, size, size * tp_rank
    return 0, layer.output_size_per_partition, layer.output_size_per_partition * tp_rank


def expected_shards(layer) -> set:
    """Shard ids the checkpoint's loader must deliver for every parameter of ``layer``."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    if isinstance(layer, QKVParallelLinear):
        return {"q", "k", "v"}
    if isinstance(layer, MergedColumnParallelLinear):
        return set(range(len(layer.output_sizes)))
    return {None}


def mark_loaded(layer, name: str, shard_id) -> None:
    layer.__dict__.setdefault("_sw_loaded", {}).setdefault(name, set()).add(shard_id)


def check_loaded(layer, prefix: str, required: list[str]) -> None:
    """Every required parameter was delivered for every shard (vLLM skips its own "weights not initialized"
    check for quantized models: a tensor missing from the checkpoint would otherwise serve uninitialized memory).
    A fused layer stored fused on disk (Phi-3's qkv_proj) arrives in one piece (shard id None)."""
    want = expected_shards(layer)
    loaded = layer.__dict__.get("_sw_loaded", {})
    for name in required:
        got = loaded.get(name, set())
        if got == want or got == {None}:
            continue
        missing = sorted(str(s) for s in want - got) if got else []
        what = f" (shards {', '.join(missing)})" if missing else ""
        raise FormatError(f"{prefix}.{name}: missing from the checkpoint{what}; the checkpoint is incomplete")


class LinearSpec:
    """What one scheme instance knows about the checkpoint tensors of its layer."""

    def __init__(self, prefix: str, bits: int, layout: BlockLayout, symmetric: bool, in_features: int):
        self.prefix = prefix
        self.bits = bits
        self.layout = layout
        self.symmetric = symmetric
        self.k = in_features

    def _err(self, name: str, msg: str) -> FormatError:
        if "disagree" not in msg:
            msg += " - the checkpoint and its config.json disagree"
        return FormatError(f"{self.prefix}.{name}: {msg}")

    # --- transforms (checkpoint tensor of one shard -> kernel layout at full shard size) --------------------------
    def check_packed(self, w: torch.Tensor, n: int) -> None:
        """Refuse a ``weight_packed`` tensor whose shape/dtype the config does not predict."""
        want = (n, -(-self.k // (32 // self.bits)))
        if w.dtype != torch.int32 or tuple(w.shape) != want:
            raise self._err(
                "weight_packed",
                f"has shape {tuple(w.shape)} {w.dtype}, but the config (bits={self.bits}, in_features={self.k}, "
                f"out_features={n}) needs {want} int32 - the checkpoint and its config.json disagree",
            )

    def unpack_weight(self, w: torch.Tensor, n: int) -> torch.Tensor:
        self.check_packed(w, n)
        return unpack_codes(w, self.bits, (n, self.k), 1)

    def weight_for_kernel(self, w: torch.Tensor, n: int) -> torch.Tensor:
        if kernel_bits(self.bits) == self.bits and self.k % (32 // self.bits) == 0:
            # Same packing in the checkpoint and the kernel: pass the tensor through (after the shape check). The
            # unpack + repack round trip it replaces is the identity here and took 24 s of a 7B model's load on the
            # H200 host (106 s on 2 CPU cores).
            self.check_packed(w, n)
            return w
        return pack_codes(self.unpack_weight(w, n), kernel_bits(self.bits), 1)

    def grid_rows(self, t: torch.Tensor, n: int, name: str) -> torch.Tensor:
        nb, ng = self.layout.grid(n, self.k)
        if tuple(t.shape) != (nb, ng):
            raise self._err(
                name, f"has shape {tuple(t.shape)}, expected {(nb, ng)} for block {self.layout} of [{n}, {self.k}]"
            )
        r = self.layout.rows_per_block(n)
        return t.repeat_interleave(r, dim=0) if r > 1 else t

    def scale_for_kernel(self, s: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.grid_rows(s, n, "weight_scale").to(dtype).contiguous()

    def zero_for_kernel(self, z: torch.Tensor, n: int) -> torch.Tensor:
        nb, ng = self.layout.grid(n, self.k)
        want = (-(-nb // (32 // self.bits)), ng)
        if z.dtype != torch.int32 or tuple(z.shape) != want:
            raise self._err("weight_zero_point", f"has shape {tuple(z.shape)} {z.dtype}, expected {want} int32")
        zz = unpack_codes(z, self.bits, (nb, ng), 0)
        zz = self.grid_rows(zz, n, "weight_zero_point")
        return pack_codes(zz, kernel_bits(self.bits), 0)


def wrap_loader(layer, name: str, layer_loader, transform):
    """A param weight_loader: transform the shard's checkpoint tensor, then delegate to the layer's loader."""

    def load(param, loaded_weight, shard_id=None):
        w = transform(loaded_weight, shard_id)
        if shard_id is None:
            layer_loader(param, w)
        else:
            layer_loader(param, w, shard_id)
        mark_loaded(layer, name, shard_id)

    return load


def stash_loader(layer, key: str):
    """Loader for variable-length tensors: keep the checkpoint tensor per shard on the layer (no TP here)."""

    def load(param, loaded_weight, shard_id=None):
        layer._sw_stash.setdefault(key, {})[shard_id] = loaded_weight.detach().clone()
        mark_loaded(layer, key, shard_id)

    return load


def finalize_sparse(layer, n_full_shard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's held-out entries as (rows, cols, vals float32) in the layer's local [N_p, K_p] coordinates."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    idx_by = layer._sw_stash.get("sparse_index", {})
    val_by = layer._sw_stash.get("sparse_value", {})
    if set(idx_by) != set(val_by):
        raise FormatError(f"{layer.prefix}: sparse_index and sparse_value are not both present for every shard")
    k_full = layer.input_size
    rows_l, cols_l, vals_l = [], [], []
    for sid, idx in idx_by.items():
        val = val_by[sid]
        if idx.ndim != 2 or idx.shape[0] != 2 or val.ndim != 1 or val.shape[0] != idx.shape[1]:
            raise FormatError(
                f"{layer.prefix}: sparse_index {tuple(idx.shape)} / sparse_value {tuple(val.shape)} malformed"
            )
        r, c = idx[0].long(), idx[1].long()
        n_s = n_full_shard(sid)
        if idx.numel() and (int(r.min()) < 0 or int(r.max()) >= n_s or int(c.min()) < 0 or int(c.max()) >= k_full):
            raise FormatError(
                f"{layer.prefix}: a held-out/super weight lies outside its matrix [{n_s}, {k_full}] "
                f"(rows {int(r.min())}..{int(r.max())}, cols {int(c.min())}..{int(c.max())})"
            )
        if not torch.isfinite(val.float()).all():
            raise FormatError(f"{layer.prefix}: sparse_value holds NaN/Inf")
        if idx.numel() and torch.unique(r * k_full + c).numel() != r.numel():
            raise FormatError(
                f"{layer.prefix}: sparse_index lists the same (row, col) more than once"
                + (f" in shard {sid}" if sid is not None else "")
                + "; every held-out weight must appear once (duplicates would be summed)"
            )
        if isinstance(layer, RowParallelLinear):
            kp = layer.input_size_per_partition
            lo = kp * layer.tp_rank
            keep = (c >= lo) & (c < lo + kp)
            r, c, v = r[keep], c[keep] - lo, val[keep]
        else:
            off, size, start = shard_offsets(layer, sid)
            keep = (r >= start) & (r < start + size)
            r, c, v = r[keep] - start + off, c[keep], val[keep]
        rows_l.append(r)
        cols_l.append(c)
        vals_l.append(v.float())
    if not rows_l:
        z = torch.zeros(0, dtype=torch.long)
        return z, z, torch.zeros(0)
    rows, cols, vals = torch.cat(rows_l), torch.cat(cols_l), torch.cat(vals_l)
    order = torch.argsort(rows * (k_full + 1) + cols)  # row-major order (CSR-friendly)
    return rows[order], cols[order], vals[order]


def finalize_outliers(layer) -> torch.Tensor:
    """This rank's activation-outlier input channels (union over shards; local input coordinates)."""
    by = layer._sw_stash.get("act_outlier_channels", {})
    if not by:
        return torch.zeros(0, dtype=torch.long)
    return local_channels(layer, torch.cat([t.reshape(-1).long() for t in by.values()]))


def local_channels(layer, channels: torch.Tensor) -> torch.Tensor:
    """Input channels of ``layer`` (full coordinates, any order, repeats allowed) as this rank sees them: unique,
    sorted; a row-parallel layer keeps the ones of its input window, shifted to local coordinates."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    ch = torch.unique(channels.reshape(-1).long())
    if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= layer.input_size):
        raise FormatError(f"{layer.prefix}: act_outlier_channels outside [0, {layer.input_size})")
    if isinstance(layer, RowParallelLinear):
        kp = layer.input_size_per_partition
        lo = kp * layer.tp_rank
        ch = ch[(ch >= lo) & (ch < lo + kp)] - lo
    return ch
