"""Plain-torch versions of the plugin's two extra ops (used where vllm_superweight.kernels is unavailable)."""

from __future__ import annotations

import torch


def prepare_sparse(rows, cols, vals, out_features, in_features, device) -> dict:
    return {"rows": rows.to(device=device, dtype=torch.long), "cols": cols.to(device=device, dtype=torch.long),
            "vals": vals.to(device=device, dtype=torch.float32)}


def sparse_correction(y: torch.Tensor, x: torch.Tensor, sp: dict) -> torch.Tensor:
    contrib = x.index_select(1, sp["cols"]).float() * sp["vals"]
    acc = y.float().index_add_(1, sp["rows"], contrib)
    return acc.to(y.dtype)


def int8_quant_outlier_split(x: torch.Tensor, outlier_idx, per_token: bool = True):
    xf = x.float()
    if outlier_idx is not None and outlier_idx.numel():
        xo = x.index_select(1, outlier_idx.long())
        xf = xf.index_fill(1, outlier_idx.long(), 0.0)
    else:
        xo = x[:, :0]
    amax = xf.abs().amax(dim=1, keepdim=True) if per_token else xf.abs().amax().reshape(1, 1)
    s = (amax / 127.0).clamp_min(1e-10)
    xq = torch.round(xf / s).clamp(-128, 127).to(torch.int8)
    return xq, s, xo
