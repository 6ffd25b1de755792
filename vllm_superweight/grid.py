"""Data-free grid fitting (scale + INTEGER zero point per block) and the per-matrix hold-out budget.

Stage 2 helper of the pipeline (detect -> **quantize** -> format -> load -> kernels); pure torch (CPU or CUDA).

``fit_grid``: instead of the block's min/max, fit each block's scale ``s`` and zero point ``z`` to its weights by
half-quadratic splitting, the idea of HQQ (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models"): minimise ``sum |w - s (q - z)|^p`` (p < 1: a few large errors are cheaper than many medium
ones) by alternating

  1. codes ``q = clamp(round(w / s + z), 0, 2^bits - 1)`` (the format's RTN),
  2. the sparse part of the error ``e = shrink_p(w - s (q - z), beta)`` (generalised soft threshold),
  3. the grid: least squares of ``w - e ~ s (q - z)`` over the block.

Differences from HQQ's reference implementation (written from the paper, not from its code): HQQ keeps the
min/max scale and fits a FLOAT zero point; the format stores integer zero points (what Marlin / Machete / the CPU
WNA16 kernels take), so here step 3 fits scale and offset jointly, rounds the zero point to an integer in the
code range, re-fits the scale for that integer zero point, and rounds the scale to the storage dtype
(``scale_dtype``) -- the stored scale is the one the codes are chosen for. Every iterate is scored with the
objective on the codes it actually produces and each block keeps its best iterate, min/max included, so the fit
never ends worse than min/max RTN under the chosen norm.

Also unlike HQQ, ``beta`` is relative to the block's min/max step (HQQ's absolute beta = 10 on raw weights of
|w| ~ 1e-2 makes the shrink threshold exceed every residual, i.e. a plain least-squares zero-point fit).

Held-out weights (super weights and the ``holdout`` fraction) are excluded from the fit (``held`` counts per
block; they are 0 in the blocks) and are still coded as ``q = z`` (dequantizes to exactly 0):
an integer zero point in ``[0, 2^bits - 1]`` guarantees it.

``col_weight`` (optional): the fit's error weighted per input column, e.g. by the squared input RMS of ONE
prompt -- the forward pass the super-weight detector already runs (``prompt_input_rms`` +
``fit_weight_from_rms``); no calibration set. Without it the fit sees the weights only.

Hold-out budget (``budget_curve`` per matrix, streaming, then ``allocate_budget``; ``holdout_budget`` for a dict
of weights): spend the uniform total ``sum(ceil(fraction * numel))`` where the marginal error reduction per
held-out entry is largest. The error is the relative output error of the prompt's inputs (``rel_out``) or the
relative weight error (``rel_w``, weights only).
"""

from __future__ import annotations

import math

import torch

GRID_METHODS = ("minmax", "hqq")
DEFAULT_GRID_PARAMS: dict[str, float] = {"iters": 8, "lp": 0.7, "beta": 10.0, "kappa": 1.01}


def fit_grid(
    b: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    bits: int,
    scale_dtype: torch.dtype,
    held: torch.Tensor | None = None,
    *,
    iters: int = int(DEFAULT_GRID_PARAMS["iters"]),
    lp: float = DEFAULT_GRID_PARAMS["lp"],
    beta: float = DEFAULT_GRID_PARAMS["beta"],
    kappa: float = DEFAULT_GRID_PARAMS["kappa"],
    score_p: float | None = None,
    weight: torch.Tensor | None = None,
    held_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Fit per-block scales and integer zero points to the blocks ``b`` [NB, NG, E] (float32).

    ``s`` / ``z``: the min/max starting point (scales already in ``scale_dtype``; z integer-valued floats in
    [0, 2^bits - 1], or None when symmetric: then only the scale is fitted, codes in [-2^(bits-1), 2^(bits-1)-1]).
    ``held`` [NB, NG] (int/float): the number of held-out entries of each block. Held-out entries must be 0 in
    ``b``; they are then coded ``q = z`` (residual exactly 0) and their contribution is removed from the fit's
    sums analytically, so no mask pass is needed.
    ``beta`` is relative to the block's min/max step (shrink threshold |r|^(p-1) / beta with the residual r in
    min/max steps), so the fit does not depend on the matrix's scale. ``score_p``: the norm that picks each
    block's best iterate (default ``lp``).
    ``weight`` (optional, broadcastable to ``b``, > 0): per-entry importance (e.g. the squared RMS of the input
    channel over one prompt): the objective becomes sum weight |r|^p and the least squares are weighted;
    ``held_weight`` [NB, NG]: the sum of ``weight`` over each block's held-out entries.
    Returns (s, z, info): s rounded to ``scale_dtype`` (kept as float32), z integer-valued or None.
    """
    sym = z is None
    if sym:
        lo_c, hi_c = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    else:
        lo_c, hi_c = 0.0, float(2**bits - 1)
    p = float(lp)
    score_p = p if score_p is None else float(score_p)
    tiny = torch.finfo(scale_dtype).tiny if scale_dtype != torch.float32 else 1e-30
    e_len = b.shape[-1]
    k = torch.zeros_like(s) if held is None else held.to(s.dtype)
    n = (e_len - k).clamp_min(1.0)
    unit = s.clone()  # residuals are measured in min/max steps
    bn = b / unit[..., None]
    sum_b = bn.sum(-1)
    om = None
    if weight is not None:
        om = weight.to(b.dtype).clamp_min(1e-12)
        k = torch.zeros_like(s) if held_weight is None else held_weight.to(s.dtype)
        n = (om.expand_as(b).sum(-1) - k).clamp_min(1e-12)
        sum_b = torch.linalg.vecdot(om, bn)
    sc = torch.ones_like(s)  # current scale, in units of `unit`
    s_abs = s.clone()  # current scale as stored (exact in scale_dtype)
    zc = torch.zeros_like(s) if (sym or z is None) else z.clone()
    best_s, best_z = s.clone(), zc.clone()
    best = torch.full_like(s, float("inf"))
    improved = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    bt = float(beta)
    q = torch.empty_like(bn)
    r = torch.empty_like(bn)
    a = torch.empty_like(bn)
    g = torch.empty_like(bn)
    for it in range(int(iters) + 1):
        # codes of the current grid and the residual (held-out entries: q = z, r = 0)
        torch.addcmul(zc[..., None], bn, (1.0 / sc)[..., None], out=q)
        q.round_().clamp_(lo_c, hi_c)
        torch.addcmul(bn, q, -sc[..., None], out=r)
        r.add_((zc * sc)[..., None])
        torch.abs(r, out=a)
        if p != 1.0 or score_p not in (1.0, 2.0):
            torch.clamp(a, min=1e-12, out=g)
            g.log_().mul_(p - 1.0).exp_()  # = g ** (p - 1): vectorised log/exp, ~20x faster than pow_ on CPU
        aw = a if om is None else a * om
        if score_p == 2.0:
            cur = torch.linalg.vecdot(aw, a)
        elif score_p == 1.0:
            cur = aw.sum(-1)
        elif score_p == p:
            cur = torch.linalg.vecdot(aw, g)
        else:
            ap = a.clamp_min(1e-30).log_().mul_(score_p).exp_()
            cur = ap.sum(-1) if om is None else torch.linalg.vecdot(ap, om.expand_as(ap))
        del aw
        if it == 0:
            cur = cur * (1.0 - 1e-6)  # min/max wins ties
        better = cur < best
        best = torch.where(better, cur, best)
        best_s = torch.where(better, s_abs, best_s)
        best_z = torch.where(better, zc, best_z)
        if it > 0:
            improved |= better
        if it == int(iters):
            break
        # sparse part of the error: e = sign(r) * max(|r| - |r|^(p-1) / beta, 0); the grid fits t = bn - e
        # (weighted, the prox of weight_i |e|^p: the threshold of entry i is weight_i |r|^(p-1) / beta)
        if p == 1.0:
            if om is None:
                a.sub_(1.0 / bt)
            else:
                a.sub_(om / bt)
        else:
            if om is not None:
                g.mul_(om)
            a.sub_(g, alpha=1.0 / bt)
        a.clamp_(min=0.0)
        e = torch.copysign(a, r, out=g)
        if om is None:
            sq = q.sum(-1) - k * zc
            sqq = torch.linalg.vecdot(q, q) - k * zc * zc
            st = sum_b - e.sum(-1)
            sqt = torch.linalg.vecdot(q, bn) - torch.linalg.vecdot(q, e)
        else:
            qw = torch.mul(q, om, out=r)
            sq = qw.sum(-1) - k * zc
            sqq = torch.linalg.vecdot(qw, q) - k * zc * zc
            st = sum_b - torch.linalg.vecdot(om, e)
            sqt = torch.linalg.vecdot(qw, bn) - torch.linalg.vecdot(qw, e)
        if sym:
            zn = zc
        else:
            var = n * sqq - sq * sq
            ok = var > 1e-9 * n * n
            slope = (n * sqt - sq * st) / torch.where(ok, var, torch.ones_like(var))
            slope = torch.where(ok & (slope > 0), slope, sc)
            zn = torch.round((slope * sq - st) / (slope * n)).clamp_(lo_c, hi_c)
        # least-squares scale for the integer zero point: sum d t / sum d^2 with d = q - zn over fitted entries
        den = sqq - 2.0 * zn * sq + n * zn * zn
        num = sqt - zn * st
        sn = num / den.clamp_min(1e-30)
        ok = (den > 1e-9) & (sn > 0) & torch.isfinite(sn)
        # the stored scale is the one the codes are computed for
        s_abs = _round_dtype(torch.where(ok, sn, sc) * unit, scale_dtype, tiny)
        sc = s_abs / unit
        zc = torch.where(ok, zn, zc)
        bt *= kappa
    info = {"blocks_improved": int(improved.sum()), "blocks": int(improved.numel())}
    return best_s, (None if sym else best_z), info


def fit_grid_chunked(b, s, z, bits, scale_dtype, held=None, *, chunk_elems: int | None = None, **kw):
    """``fit_grid`` over slices of block rows (blocks are independent): on CPU, slices of ~``chunk_elems``
    (default 2^17) elements keep the iteration's temporaries in cache; on CUDA the whole matrix at once."""
    nb = b.shape[0]
    per_row = b[0].numel() if nb else 1
    if chunk_elems is None:
        chunk_elems = 1 << 17 if b.device.type == "cpu" else 1 << 62
    rows = max(1, int(chunk_elems) // max(per_row, 1))
    if rows >= nb:
        return fit_grid(b, s, z, bits, scale_dtype, held, **kw)

    ss: list[torch.Tensor] = []
    zs: list[torch.Tensor] = []
    imp, tot = 0, 0
    wt, hw = kw.pop("weight", None), kw.pop("held_weight", None)
    for i in range(0, nb, rows):
        wi = None if wt is None else (wt if wt.shape[0] == 1 else wt[i : i + rows])
        si, zi, info = fit_grid(
            b[i : i + rows],
            s[i : i + rows],
            None if z is None else z[i : i + rows],
            bits,
            scale_dtype,
            None if held is None else held[i : i + rows],
            weight=wi,
            held_weight=None if hw is None else hw[i : i + rows],
            **kw,
        )
        ss.append(si)
        if zi is not None:
            zs.append(zi)
        imp += info["blocks_improved"]
        tot += info["blocks"]
    return torch.cat(ss), (None if z is None else torch.cat(zs)), {"blocks_improved": imp, "blocks": tot}


def _round_dtype(s: torch.Tensor, sdtype: torch.dtype, tiny: float) -> torch.Tensor:
    return s.clamp_min(tiny).to(sdtype).float().clamp_min(tiny)


# ----------------------------------------------------------------------------------------------------------
# per-matrix hold-out budget
# ----------------------------------------------------------------------------------------------------------
def allocate_budget(curves: dict[str, list[tuple[int, float]]], total: int) -> dict[str, int]:
    """Split ``total`` held-out entries over matrices by equal marginal benefit (greedy on concave hulls).

    ``curves[name]`` = [(count_0=0, err_0), (count_1, err_1), ...] with increasing counts: the matrix's error
    (any additive, comparable unit) when its ``count`` largest weights are held out. Each matrix gets one of its
    curve's counts; the greedy step takes the segment with the largest error drop per held-out entry (on each
    curve's lower convex hull) while the total fits.
    """
    hulls = {}
    for name, pts in curves.items():
        pts = sorted(pts)
        hull = [pts[0]]
        for p in pts[1:]:
            hull.append(p)
            # keep the lower convex hull (slopes increasing: marginal benefit decreasing)
            while len(hull) >= 3:
                (x0, y0), (x1, y1), (x2, y2) = hull[-3], hull[-2], hull[-1]
                if (y1 - y0) * (x2 - x1) >= (y2 - y1) * (x1 - x0):  # middle point above the chord
                    del hull[-2]
                else:
                    break
        hulls[name] = hull
    pos = {name: 0 for name in hulls}
    used = 0
    while True:
        cand = []
        for name, h in hulls.items():
            i = pos[name]
            if i + 1 < len(h):
                (x0, y0), (x1, y1) = h[i], h[i + 1]
                if x1 > x0:
                    cand.append(((y0 - y1) / (x1 - x0), name, x1 - x0))
        if not cand:
            break
        cand.sort(reverse=True)
        took = False
        for gain, name, dx in cand:
            if gain <= 0:
                break
            if used + dx <= total:
                pos[name] += 1
                used += dx
                took = True
                break
        if not took:
            break
    return {name: hulls[name][pos[name]][0] for name in hulls}


def effective_bits(tensors: dict[str, torch.Tensor], numel: int) -> float:
    """Stored bits per quantized weight: every tensor of the format for one Linear, over N*K."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values()) / numel


def prompt_input_rms(model, tokenizer, prompt: str, linears: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """Per input channel RMS of every Linear's input over one prompt's tokens (one forward pass, no data set).

    Returns {module: {"all": [K], "skip_first": [K]}} (float32, CPU): over all tokens, and without the first
    token (which carries the massive activations / attention sink).
    """
    out: dict[str, dict] = {}
    hooks = []

    def hook(name):
        def f(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            out[name] = {
                "all": x.pow(2).mean(0).sqrt().cpu(),
                "skip_first": (x[1:] if x.shape[0] > 1 else x).pow(2).mean(0).sqrt().cpu(),
            }

        return f

    for name, mod in linears.items():
        hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        dev = next(model.parameters()).device
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            model(input_ids=enc.input_ids.to(dev))
    finally:
        for h in hooks:
            h.remove()
    return out


BUDGET_MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def matrix_error(w: torch.Tensor, deq: torch.Tensor, metric: str, act: torch.Tensor | None = None) -> float:
    """Error of one dequantized matrix in the budget's unit.

    ``w``: rel. Frobenius^2 of the weight error; ``rel_out``: the same with input channel c weighted by act[c]^2
    (the output error of a prompt whose inputs have per-channel RMS ``act``, relative to the output's energy);
    ``out``: unnormalised output error; ``abs_w``: unnormalised weight error.
    """
    d = (deq - w.float()).pow_(2)
    wf = w.float().pow(2)
    if metric in ("rel_out", "out"):
        if act is None:
            raise ValueError(f"matrix_error: metric {metric!r} needs the prompt's input RMS (act)")
        a2 = act.float().to(w.device).pow(2)
        e = float(d.sum(0) @ a2)
        ref = float(wf.sum(0) @ a2)
    else:
        e = float(d.sum())
        ref = float(wf.sum())
    if metric in ("rel_out", "rel_w"):
        return e / max(ref, 1e-30)
    return e


def fit_weight_from_rms(rms: torch.Tensor, power: float = 2.0, damp: float = 0.1) -> torch.Tensor:
    """Per-input-column importance for ``quantize_weight(col_weight=...)`` from one prompt's input RMS [K]:
    ``rms^power`` normalised to mean 1, plus ``damp`` (so that no column is ignored)."""
    a = rms.float().clamp_min(1e-12).pow(power)
    return a / a.mean() + float(damp)


def budget_curve(
    w: torch.Tensor,
    fraction: float,
    bits: int,
    layout,
    *,
    extra=(),
    metric: str = "rel_out",
    act: torch.Tensor | None = None,
    grid: str = "minmax",
    grid_params: dict | None = None,
    multipliers=BUDGET_MULTIPLIERS,
    scale_dtype: torch.dtype = torch.bfloat16,
    col_scale: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
) -> list[tuple[int, float]]:
    """One matrix's error (``matrix_error``) with ``m x ceil(fraction * numel)`` largest-|w| weights held out,
    for every m of ``multipliers`` (the input of ``allocate_budget``; one streaming pass of the converter)."""
    from .quantize import dequantize, quantize_weight, select_holdout

    base = int(math.ceil(fraction * w.numel()))
    pts = []
    for mlt in multipliers:
        c = min(int(round(mlt * base)), w.numel() // 4)
        mask = select_holdout(w, 0.0, extra, count=c, col_scale=col_scale)
        ql = quantize_weight(
            w,
            bits,
            layout,
            False,
            holdout_mask=mask,
            scale_dtype=scale_dtype,
            grid=grid,
            grid_params=grid_params,
            col_weight=col_weight if grid != "minmax" else None,
        )
        deq = dequantize(ql.q, ql.scale, ql.zero, layout)
        if ql.sparse_rows.numel():
            deq[ql.sparse_rows, ql.sparse_cols] = ql.sparse_vals.float()
        pts.append((c, matrix_error(w, deq, metric, act)))
    return pts


def holdout_budget(
    weights: dict[str, torch.Tensor],
    fraction: float,
    bits: int,
    layout,
    *,
    extras: dict[str, list] | None = None,
    metric: str = "rel_w",
    act_rms: dict[str, dict] | None = None,
    act_key: str = "skip_first",
    scheme: str = "greedy",
    grid: str = "minmax",
    grid_params: dict | None = None,
    multipliers=BUDGET_MULTIPLIERS,
    scale_dtype: torch.dtype = torch.bfloat16,
    col_scales: dict[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Per-matrix hold-out counts (largest |w| of each matrix) summing to at most the uniform budget.

    The uniform budget is ``sum(ceil(fraction * numel))`` over ``weights``. Each matrix's error (``metric``, see
    ``matrix_error``) is measured at ``multipliers`` x its uniform count (quantized with ``grid``), and the
    counts are chosen by equal marginal error reduction per held-out entry (``allocate_budget``).
    """
    if scheme != "greedy":
        raise ValueError(f"unknown budget scheme {scheme!r}")
    extras = extras or {}
    total = sum(int(math.ceil(fraction * w.numel())) for w in weights.values())
    curves = {
        name: budget_curve(
            w,
            fraction,
            bits,
            layout,
            extra=extras.get(name, ()),
            metric=metric,
            act=None if metric not in ("rel_out", "out") or act_rms is None else act_rms[name][act_key],
            grid=grid,
            grid_params=grid_params,
            multipliers=multipliers,
            scale_dtype=scale_dtype,
            col_scale=None if col_scales is None else col_scales[name],
        )
        for name, w in weights.items()
    }
    return allocate_budget(curves, total)
