"""Data-free super-weight detection (Yu et al., "The Super Weight in Large Language Models", arXiv 2411.07191).

One prompt, one forward pass per iteration, hooks on the input and output of every ``mlp.down_proj``:

1. In every early layer (``layer < ceil(max_layer_frac * n_layers)``) look for an *output spike*: a channel ``row``
   of the down_proj output whose max |y| over tokens is ``rel_threshold`` times the layer's typical channel
   (median over channels of the per-channel max |y|).
2. For the spiking token ``t`` split ``y[t, row] = sum_c x[t, c] * W[row, c]`` into contributions and accept every
   column ``c`` whose contribution (same sign as ``y``) is at least ``share_threshold`` of ``|y[t, row]|`` and whose
   input ``x[t, c]`` is itself an *input spike* (``in_rel_threshold`` times the typical input channel). A weight
   that "explains" the output this way is a super weight; siblings sharing the row are found in the same pass.
3. Guards against false positives:
   * late-layer echoes (Llama-7B's layer 30 output exceeds the SW layer's): only early layers are searched, the
     output must be explained by single weights (a sum of many moderate terms is rejected), and with
     ``require_growth`` the layer must grow |h| at ``(t, row)`` (a layer that cancels the super activation is an
     eraser, not a super weight);
   * orphaned input spikes (after a SW is zeroed, ``x[:, col]`` stays huge and turns ordinary ``W[row', col]`` into
     spikes): the weight must be an outlier of its matrix (``|w| >= weight_rel_threshold * median|W|``) or its
     contribution must be a large share (``sa_share_threshold``) of the layer's original super activation;
   * peel artefacts (zeroing an upstream SW changes downstream activations): in later passes the row and the
     column must have spiked in the original model too, and the growth test must hold there.
4. Zero what was accepted and run again (the peel loop) until a pass accepts nothing; then restore every zeroed
   weight, so the model is bit-identical afterwards. Siblings masked by a larger one surface in later passes.

Thresholds are relative on purpose: an absolute one (the reference code's ``> 50``) misses real super weights, e.g.
SmolLM2-1.7B's input spike is only 26. With the super weights in place, the inputs of every quantizable Linear are
scanned for activation-outlier channels (the FP16 channels of the int8-activation path). ``confirm=True`` ablates
each super weight alone (and per sibling group, and all together) and measures the super-activation collapse and
the loss on a short built-in text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .format import DEFAULT_IGNORE, SuperWeight, dtype_name, is_ignored
from .models import decoder_layers

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
# Plain text for the loss of the optional ablation check (built in, so detection stays data-free).
DEFAULT_CONFIRM_TEXT = (
    "The museum opened its new wing on a rainy morning in early spring. Visitors lined up outside the entrance, "
    "holding umbrellas and talking about the paintings they hoped to see. Inside, the rooms were quiet and bright, "
    "and the guides explained how each work had been cleaned and restored over the past two years. By the "
    "afternoon the weather had cleared, and many people walked through the garden before going home."
)

# Defaults (documented in detect_super_weights).
REL_THRESHOLD = 50.0
SHARE_THRESHOLD = 0.2
WEIGHT_REL_THRESHOLD = 10.0
SA_SHARE_THRESHOLD = 0.25
MAX_LAYER_FRAC = 0.5
MAX_ITER = 16
MAX_ROWS_PER_LAYER = 8
MAX_COLS_PER_ROW = 8
ACT_REL_THRESHOLD = 20.0
ACT_FLOOR = 1.0
MAX_ACT_CHANNELS = 32
CONFIRM_SA_RATIO = 0.5
CONFIRM_LOSS_DELTA = 0.5

PUBLISHED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "published_super_weights.json")


@dataclasses.dataclass
class DetectionResult:
    super_weights: list[SuperWeight]
    activation_outliers: dict[str, dict]  # Linear name -> {"channels": [...], "magnitudes": [...]}
    profile: list[dict]  # per layer of the original model (see activation_profile)
    prompt: str
    thresholds: dict
    iterations: int
    published: dict | None = None
    group_ablation: dict | None = None  # confirm=True: every super weight zeroed at once

    def to_json(self) -> dict:
        return {
            "super_weights": [sw.to_dict() for sw in self.super_weights],
            "activation_outliers": self.activation_outliers,
            "profile": self.profile,
            "prompt": self.prompt,
            "thresholds": self.thresholds,
            "iterations": self.iterations,
            "published": self.published,
            "group_ablation": self.group_ablation,
        }


# ------------------------------------------------------------------------------------------------------------
# Forward passes with hooks
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Pass:
    """What one hooked forward pass saw (fp32, batch flattened into tokens)."""

    down_in: dict[int, torch.Tensor]  # layer -> [T, H]
    down_out: dict[int, torch.Tensor]  # layer -> [T, D]
    h_in: dict[int, torch.Tensor]  # layer -> decoder-layer input [T, D]
    h_out: dict[int, torch.Tensor]  # layer -> decoder-layer output [T, D]
    linear_in_max: dict[str, torch.Tensor]  # Linear name -> per-channel max |x| over tokens
    loss: float | None


def _tokens(x: torch.Tensor) -> torch.Tensor:
    x = x[0] if isinstance(x, (tuple, list)) else x
    return x.detach().float().reshape(-1, x.shape[-1])


def _encode(tokenizer, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(prompt, return_tensors="pt")
    out = {"input_ids": enc["input_ids"].to(device)}
    if enc.get("attention_mask") is not None:
        out["attention_mask"] = enc["attention_mask"].to(device)
    return out


def _quantizable_linears(model) -> dict[str, torch.nn.Module]:
    """Every nn.Linear inside the decoder layers that the converter quantizes (q/k/v/o/gate/up/down, fused ones)."""
    layer_ids = {id(m) for m in decoder_layers(model)}
    out: dict[str, torch.nn.Module] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if id(mod) in layer_ids:
            inside.append(name + ".")
        if isinstance(mod, torch.nn.Linear) and any(name.startswith(p) for p in inside):
            if not is_ignored(name, DEFAULT_IGNORE):
                out[name] = mod
    return out


def _run(
    model,
    inputs: dict[str, torch.Tensor],
    *,
    down: bool = True,
    residual: bool = True,
    linears: dict[str, torch.nn.Module] | None = None,
    loss: bool = False,
) -> _Pass:
    layers = decoder_layers(model)
    p = _Pass({}, {}, {}, {}, {}, None)
    handles = []

    def down_hook(i: int):
        def f(_m, args, out):
            p.down_in[i] = _tokens(args[0])
            p.down_out[i] = _tokens(out)

        return f

    def pre_hook(i: int):
        def f(_m, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if h is not None:
                p.h_in[i] = _tokens(h)

        return f

    def post_hook(i: int):
        def f(_m, _args, out):
            p.h_out[i] = _tokens(out)

        return f

    def lin_hook(name: str):
        def f(_m, args, _out):
            p.linear_in_max[name] = _tokens(args[0]).abs().amax(0)

        return f

    try:
        for i, layer in enumerate(layers):
            if down:
                handles.append(layer.mlp.down_proj.register_forward_hook(down_hook(i)))
            if residual:
                handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(post_hook(i)))
        for name, mod in (linears or {}).items():
            handles.append(mod.register_forward_hook(lin_hook(name)))
        with torch.no_grad():
            kw = dict(inputs, use_cache=False)
            if loss:
                kw["labels"] = inputs["input_ids"]
            out = model(**kw)
        if loss and getattr(out, "loss", None) is not None:
            p.loss = float(out.loss)
    finally:
        for h in handles:
            h.remove()
    return p


def _signed_max(x: torch.Tensor) -> tuple[float, int, int]:
    """(signed value at max |x|, token, channel) of a [T, C] tensor."""
    idx = int(x.abs().argmax())
    t, c = divmod(idx, x.shape[1])
    return float(x[t, c]), t, c


def _median_channel_max(x: torch.Tensor) -> float:
    """Typical magnitude of a [T, C] activation: the median over channels of the per-channel max |x|."""
    return float(x.abs().amax(0).median())


def _profile_from(p: _Pass) -> list[dict]:
    prof = []
    for i in sorted(p.down_out):
        vin, tin, cin = _signed_max(p.down_in[i])
        vout, tout, cout = _signed_max(p.down_out[i])
        row = {
            "layer": i,
            "down_in_max": vin,
            "down_in_channel": cin,
            "down_in_token": tin,
            "down_in_typical": _median_channel_max(p.down_in[i]),
            "down_out_max": vout,
            "down_out_channel": cout,
            "down_out_token": tout,
            "down_out_typical": _median_channel_max(p.down_out[i]),
        }
        if i in p.h_out:
            vh, _, ch = _signed_max(p.h_out[i])
            row["hidden_max"], row["hidden_channel"] = vh, ch
        else:
            row["hidden_max"], row["hidden_channel"] = None, None
        prof.append(row)
    return prof


def activation_profile(model, tokenizer, prompt: str = DEFAULT_PROMPT) -> list[dict]:
    """Per decoder layer of the model as it is: signed max-|.| of the down_proj input and output (and where),
    their typical channel magnitude, and the signed max-|.| of the layer's output hidden state (paper Fig. 3)."""
    inputs = _encode(tokenizer, prompt, next(model.parameters()).device)
    return _profile_from(_run(model, inputs))


# ------------------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------------------
def _module_names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


@contextmanager
def _zeroed(weights: list[tuple[torch.Tensor, int, int]]) -> Iterator[None]:
    """Temporarily zero ``weight[row, col]`` for each entry; restores the exact original elements on exit."""
    saved = []
    try:
        with torch.no_grad():
            for w, r, c in weights:
                saved.append((w, r, c, w[r, c].clone()))
                w[r, c] = 0
        yield
    finally:
        with torch.no_grad():
            for w, r, c, v in reversed(saved):
                w[r, c] = v


def _activation_outliers(lin_max: dict[str, torch.Tensor], rel: float, floor: float, cap: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, m in lin_max.items():
        typ = float(m.median())
        thr = max(rel * typ, floor)
        idx = torch.nonzero(m > thr).flatten()
        if idx.numel() == 0:
            continue
        order = torch.argsort(m[idx], descending=True)[:cap]
        idx = idx[order]
        out[name] = {
            "channels": [int(c) for c in idx],
            "magnitudes": [float(m[c]) for c in idx],
            "typical": typ,
        }
    return out


def detect_super_weights(
    model,
    tokenizer,
    prompt: str = DEFAULT_PROMPT,
    *,
    rel_threshold: float = REL_THRESHOLD,
    in_rel_threshold: float | None = None,
    share_threshold: float = SHARE_THRESHOLD,
    weight_rel_threshold: float = WEIGHT_REL_THRESHOLD,
    sa_share_threshold: float = SA_SHARE_THRESHOLD,
    max_layer_frac: float = MAX_LAYER_FRAC,
    require_growth: bool = True,
    max_iter: int = MAX_ITER,
    max_rows_per_layer: int = MAX_ROWS_PER_LAYER,
    act_rel_threshold: float = ACT_REL_THRESHOLD,
    act_floor: float = ACT_FLOOR,
    max_act_channels: int = MAX_ACT_CHANNELS,
    confirm: bool = False,
    confirm_sa_ratio: float = CONFIRM_SA_RATIO,
    confirm_loss_delta: float = CONFIRM_LOSS_DELTA,
    confirm_text: str | None = None,
    progress: bool = True,
) -> DetectionResult:
    """Find the super weights of ``model`` with one prompt (peel loop), plus the activation-outlier channels.

    Criteria (all relative; "typical" = median over channels of the per-channel max |.| over the prompt's tokens):
      rel_threshold (50): a down_proj output channel spikes if its max |y| >= 50x the layer's typical output.
      in_rel_threshold (= rel_threshold): the explaining input x[t, col] must be >= 50x the typical input.
      share_threshold (0.2): x[t, col] * W[row, col] must carry >= 20% of y[t, row] (same sign).
      weight_rel_threshold (10) / sa_share_threshold (0.25): |W[row, col]| >= 10x median |W| of the matrix, or its
        contribution in the original model >= 25% of the layer's original largest |y| (rejects orphaned spikes).
      In later peel passes the row and column must also spike in the original model (not only after zeroing).
      max_layer_frac (0.5): only layers < ceil(0.5 * n_layers) are searched (SWs are early; late spikes are echoes;
        OLMo-7B's published layer-24 entry needs 0.8).
      require_growth (True): the layer must grow |h[t, row]|, now and in the original model, also at the token
        where that row spiked originally (a layer that cancels the SA is an eraser, like the last layers).
      act_rel_threshold (20) / act_floor (1.0) / max_act_channels (32): a Linear input channel is an activation
        outlier if its max |x| > max(20x the median channel, 1.0); at most 32 per module, largest first.
      confirm_sa_ratio (0.5) / confirm_loss_delta (0.5 nats): with ``confirm``, a SW is confirmed if zeroing it
        (alone, or with its siblings of the same layer and row) leaves <= 50% of the super activation at its
        layer's output or raises the loss on ``confirm_text`` (default DEFAULT_CONFIRM_TEXT) by >= 0.5 nats.
    The model is only modified temporarily; every zeroed weight is restored bit-exactly before returning.
    """
    from tqdm.auto import tqdm

    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    in_rel = rel_threshold if in_rel_threshold is None else in_rel_threshold
    layers = decoder_layers(model)
    n_layers = len(layers)
    n_search = max(1, min(n_layers, math.ceil(max_layer_frac * n_layers)))
    names = _module_names(model)
    device = next(model.parameters()).device
    inputs = _encode(tokenizer, prompt, device)
    linears = _quantizable_linears(model)

    crit = _Criteria(
        rel_threshold,
        in_rel,
        share_threshold,
        weight_rel_threshold,
        sa_share_threshold,
        require_growth,
        max_rows_per_layer,
    )
    found: list[SuperWeight] = []
    zeroed: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []  # (weight, row, col, original element)
    w_median: dict[int, float] = {}
    p0: _Pass | None = None  # the pass on the original model
    iterations = 0

    bar = tqdm(total=max_iter, desc="super-weight peel", disable=not progress, leave=False)
    try:
        for _ in range(max_iter):
            p = _run(model, inputs, linears=linears if p0 is None else None)
            if p0 is None:
                p0 = p
            iterations += 1
            bar.update(1)
            new: list[SuperWeight] = []
            for i in range(n_search):
                new.extend(_layer_candidates(i, p, p0, layers[i].mlp.down_proj, names, found, w_median, crit))
            bar.set_postfix(found=len(found) + len(new))
            if not new:
                break
            with torch.no_grad():
                for sw in new:
                    w = layers[sw.layer].mlp.down_proj.weight
                    zeroed.append((w, sw.row, sw.col, w[sw.row, sw.col].clone()))
                    w[sw.row, sw.col] = 0
            found.extend(new)
    finally:
        bar.close()
        with torch.no_grad():
            for w, r, c, v in reversed(zeroed):
                w[r, c] = v
    found.sort(key=lambda s: s.coord)
    _check_restored(layers, found)

    thresholds = {
        "rel_threshold": rel_threshold,
        "in_rel_threshold": in_rel,
        "share_threshold": share_threshold,
        "weight_rel_threshold": weight_rel_threshold,
        "sa_share_threshold": sa_share_threshold,
        "max_layer_frac": max_layer_frac,
        "searched_layers": n_search,
        "num_layers": n_layers,
        "require_growth": require_growth,
        "max_iter": max_iter,
        "max_rows_per_layer": max_rows_per_layer,
        "max_cols_per_row": MAX_COLS_PER_ROW,
        "act_rel_threshold": act_rel_threshold,
        "act_floor": act_floor,
        "max_act_channels": max_act_channels,
        "typical": "median over channels of the per-channel max |.| over the prompt tokens",
    }
    result = DetectionResult(
        super_weights=found,
        activation_outliers=_activation_outliers(p0.linear_in_max, act_rel_threshold, act_floor, max_act_channels),
        profile=_profile_from(p0),
        prompt=prompt,
        thresholds=thresholds,
        iterations=iterations,
    )
    if confirm:
        thresholds.update(confirm_sa_ratio=confirm_sa_ratio, confirm_loss_delta=confirm_loss_delta)
        confirm_super_weights(
            model,
            tokenizer,
            result,
            sa_ratio=confirm_sa_ratio,
            loss_delta=confirm_loss_delta,
            text=confirm_text,
            progress=progress,
        )
    return result


@dataclasses.dataclass(frozen=True)
class _Criteria:
    rel_out: float
    rel_in: float
    share: float
    w_rel: float
    sa_share: float
    require_growth: bool
    max_rows: int


def _layer_candidates(
    i: int,
    p: _Pass,
    p0: _Pass,
    down: torch.nn.Module,
    names: dict[int, str],
    found: list[SuperWeight],
    w_median: dict[int, float],
    crit: _Criteria,
) -> list[SuperWeight]:
    """Super weights that explain the output spikes of layer ``i``'s down_proj in pass ``p``.

    ``p0`` is the pass on the original model: the growth test must hold there too (a layer that erases the super
    activation of the original model is not a super weight once the peel loop has removed that activation), and
    in later passes the row and the column must have spiked there as well (not only after upstream zeroing).
    """
    X, Y = p.down_in[i], p.down_out[i]
    typ_out, typ_in = _median_channel_max(Y), _median_channel_max(X)
    ch_max, ch_tok = Y.abs().max(0)
    rows = torch.nonzero(ch_max >= crit.rel_out * typ_out).flatten()
    if rows.numel() == 0:
        return []
    rows = rows[torch.argsort(ch_max[rows], descending=True)][: crit.max_rows]
    W = down.weight.detach()
    sa_ref = float(p0.down_out[i].abs().max())  # the layer's largest output in the original model
    have = {sw.coord for sw in found}
    out: list[SuperWeight] = []
    for row in rows.tolist():
        t = int(ch_tok[row])
        y = float(Y[t, row])
        if crit.require_growth:
            t0 = int(p0.down_out[i][:, row].abs().argmax())  # where this row spiked in the original model
            if not (_grows(p, i, t, row) and _grows(p0, i, t, row) and _grows(p0, i, t0, row)):
                continue  # the layer shrinks the residual here: an eraser/echo, not a super weight
        wrow = W[row].float()
        contrib = X[t] * wrow
        top = torch.topk(contrib * math.copysign(1.0, y), min(MAX_COLS_PER_ROW, contrib.numel()))
        for cval, col in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if cval < crit.share * abs(y):
                break  # sorted: no further column explains enough of y
            if (i, row, col) in have or abs(float(X[t, col])) < crit.rel_in * typ_in:
                continue
            if p is not p0 and not _spikes(p0, i, t, row, col, crit.rel_out, crit.rel_in):
                continue  # not a spike of the original model: an artefact of weights zeroed upstream
            if i not in w_median:
                w_median[i] = float(W.abs().float().median())
            w_ok = abs(float(wrow[col])) >= crit.w_rel * w_median[i]
            # the contribution in the ORIGINAL model (after peeling, x[:, col] can differ from the served model's)
            y0 = float(p0.down_out[i][t, row])
            c0 = float(p0.down_in[i][t, col]) * float(wrow[col]) * math.copysign(1.0, y0)
            if not (w_ok or c0 >= crit.sa_share * sa_ref):
                continue  # an ordinary weight times an (orphaned) input spike
            out.append(
                SuperWeight(
                    layer=i,
                    module=names.get(id(down), f"model.layers.{i}.mlp.down_proj"),
                    row=row,
                    col=col,
                    value=float(W[row, col]),
                    dtype=dtype_name(W.dtype),
                    input_spike=float(X[t, col]),
                    output_spike=y,
                )
            )
            have.add((i, row, col))
    return out


def _spikes(p: _Pass, i: int, t: int, row: int, col: int, rel_out: float, rel_in: float) -> bool:
    """Whether y[t, row] and x[t, col] of layer ``i`` are output / input spikes in pass ``p``."""
    X, Y = p.down_in[i], p.down_out[i]
    return abs(float(Y[t, row])) >= rel_out * _median_channel_max(Y) and abs(
        float(X[t, col])
    ) >= rel_in * _median_channel_max(X)


def _grows(p: _Pass, i: int, t: int, row: int) -> bool:
    """Whether decoder layer ``i`` increases |h[t, row]| (True when the residual was not captured)."""
    if i not in p.h_in or i not in p.h_out:
        return True
    return abs(float(p.h_out[i][t, row])) > abs(float(p.h_in[i][t, row]))


def _check_restored(layers, found: list[SuperWeight]) -> None:
    for sw in found:
        w = layers[sw.layer].mlp.down_proj.weight
        if float(w.detach()[sw.row, sw.col]) != sw.value:
            raise RuntimeError(f"failed to restore {sw.module}[{sw.row}, {sw.col}]")


# ------------------------------------------------------------------------------------------------------------
# Confirmation by ablation
# ------------------------------------------------------------------------------------------------------------
def _ablation_stats(p: _Pass, keys: list[tuple[int, int]]) -> dict[str, Any]:
    """Loss, max |h| over all layers, and per SA key (layer, row) the max |h[:, row]| at that layer's output."""
    return {
        "loss": p.loss,
        "hidden_max": max(float(h.abs().max()) for h in p.h_out.values()),
        "sa": {(layer, row): float(p.h_out[layer][:, row].abs().max()) for layer, row in keys},
    }


def _ablation_summary(base: dict, st: dict, key: tuple[int, int]) -> dict[str, float | None]:
    lb, la = base["loss"], st["loss"]
    sb, sa = base["sa"][key], st["sa"][key]
    return {
        "loss_base": lb,
        "loss": la,
        "loss_delta": (la - lb) if la is not None and lb is not None else None,
        "sa_base": sb,
        "sa": sa,
        "sa_ratio": (sa / sb) if sb else None,
        "hidden_max_base": base["hidden_max"],
        "hidden_max": st["hidden_max"],
    }


def _meets(ab: dict, sa_ratio: float, loss_delta: float) -> bool:
    r, dl = ab.get("sa_ratio"), ab.get("loss_delta")
    return bool((r is not None and r <= sa_ratio) or (dl is not None and dl >= loss_delta))


def confirm_super_weights(
    model,
    tokenizer,
    result: DetectionResult,
    *,
    sa_ratio: float = CONFIRM_SA_RATIO,
    loss_delta: float = CONFIRM_LOSS_DELTA,
    text: str | None = None,
    progress: bool = True,
) -> None:
    """Zero each super weight alone (then each sibling group sharing a layer and row, then all of them) and record
    the effect in ``SuperWeight.ablation`` / ``confirmed`` and ``result.group_ablation``.

    ablation = {loss_base, loss, loss_delta (mean NLL in nats on ``text``, default DEFAULT_CONFIRM_TEXT),
    sa_base, sa, sa_ratio (max |h[:, row]| over tokens at the output of the super weight's layer, i.e. the super
    activation it creates), hidden_max_base, hidden_max (max |h| over all layers)}; for siblings also
    siblings_sa_ratio / siblings_loss_delta. A super weight is confirmed if it alone, or its sibling group,
    leaves sa_ratio <= ``sa_ratio`` or raises the loss by >= ``loss_delta``. Weights are restored bit-exactly.
    """
    from tqdm.auto import tqdm

    if not result.super_weights:
        return
    layers = decoder_layers(model)
    inputs = _encode(tokenizer, text or DEFAULT_CONFIRM_TEXT, next(model.parameters()).device)
    keys = sorted({(sw.layer, sw.row) for sw in result.super_weights})

    def measure(sws: list[SuperWeight]) -> dict[str, Any]:
        with _zeroed([(layers[s.layer].mlp.down_proj.weight, s.row, s.col) for s in sws]):
            return _ablation_stats(_run(model, inputs, down=False, loss=True), keys)

    base = _ablation_stats(_run(model, inputs, down=False, loss=True), keys)
    sws = list(result.super_weights)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, sw in enumerate(sws):
        groups.setdefault((sw.layer, sw.row), []).append(i)
    ablation: list[dict[str, Any]] = []
    confirmed: list[bool] = []
    n = len(sws) + sum(len(g) > 1 for g in groups.values()) + 1
    with tqdm(total=n, desc="ablation", disable=not progress, leave=False) as bar:
        for sw in sws:
            ablation.append(_ablation_summary(base, measure([sw]), (sw.layer, sw.row)))
            confirmed.append(_meets(ablation[-1], sa_ratio, loss_delta))
            bar.update(1)
        for key, sibs in groups.items():
            if len(sibs) < 2:
                continue
            g = _ablation_summary(base, measure([sws[i] for i in sibs]), key)
            bar.update(1)
            for i in sibs:
                ablation[i]["siblings_sa_ratio"] = g["sa_ratio"]
                ablation[i]["siblings_loss_delta"] = g["loss_delta"]
                confirmed[i] = confirmed[i] or _meets(g, sa_ratio, loss_delta)
        st = measure(sws)
        bar.update(1)
    result.super_weights = [
        dataclasses.replace(sw, ablation=ablation[i], confirmed=confirmed[i]) for i, sw in enumerate(sws)
    ]
    result.group_ablation = {k: v for k, v in _ablation_summary(base, st, keys[0]).items() if not k.startswith("sa")}
    result.group_ablation["sa_ratio"] = {
        f"{layer}:{row}": (st["sa"][(layer, row)] / base["sa"][(layer, row)] if base["sa"][(layer, row)] else None)
        for layer, row in keys
    }
    _check_restored(layers, result.super_weights)


# ------------------------------------------------------------------------------------------------------------
# Published coordinates
# ------------------------------------------------------------------------------------------------------------
def load_published(path: str = PUBLISHED_PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def _text_config(config: dict | None) -> dict:
    if not config:
        return {}
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        return config["text_config"] | {"_name_or_path": config.get("_name_or_path")}
    return config


def _id_matches(key: str, text: str) -> bool:
    """Case-insensitive substring match of ``key`` in ``text`` that does not start or end inside a word
    ("llama-7b" matches "huggyllama/llama-7b-hf" but not "codellama-7b")."""
    return re.search(r"(?<![a-z0-9])" + re.escape(key.lower()) + r"(?![a-z0-9])", text.lower()) is not None


_SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size")


def _shape_score(entry_cfg: dict, cfg: dict) -> int | None:
    """None if ``cfg`` contradicts the entry's shape; else how many optional discriminators also agree."""
    for k in _SHAPE_KEYS:
        if k in cfg and cfg[k] != entry_cfg[k]:
            return None
    if not all(k in cfg for k in _SHAPE_KEYS):
        return None
    score = 0
    for k, v in entry_cfg.items():
        if k in _SHAPE_KEYS or k not in cfg or cfg[k] is None:
            continue
        same = math.isclose(float(cfg[k]), float(v), rel_tol=1e-6) if isinstance(v, (int, float)) else cfg[k] == v
        if not same:
            return None
        score += 1
    return score


def match_published(model_id_or_path: str, config: dict | None, result: DetectionResult | None) -> dict | None:
    """Which published entry (if any) this model is, its published coordinates, and whether detection agrees.

    Identification: a key of an entry found in ``model_id_or_path`` (or config ``_name_or_path``) with word
    boundaries, provided the config (if given) does not contradict the entry's shape; otherwise the config shape
    (model_type, num_hidden_layers, hidden_size, intermediate_size, plus discriminators such as
    max_position_embeddings / vocab_size when present). A shape-only match is flagged ``confidence="shape"``
    (other checkpoints may share the shape). Returns None when nothing matches.
    """
    index = load_published()
    cfg = _text_config(config)
    ids = " ".join(s for s in (model_id_or_path or "", str(cfg.get("_name_or_path") or "")) if s)
    entry, how, others = None, None, []
    for e in index["models"]:
        if any(_id_matches(k, ids) for k in e["match"]):
            if cfg and all(k in cfg for k in _SHAPE_KEYS) and _shape_score(e["config"], cfg) is None:
                continue
            entry, how = e, "id"
            break
    if entry is None and cfg:
        scored = [(s, e) for e in index["models"] if (s := _shape_score(e["config"], cfg)) is not None]
        if scored:
            best = max(s for s, _ in scored)
            tied = [e for s, e in scored if s == best]
            entry, how = tied[0], "config"
            others = [e["id"] for e in tied[1:]]
    if entry is None:
        return None

    published = [dict(sw, module=f"model.layers.{sw['layer']}.mlp.down_proj") for sw in entry["super_weights"]]
    out: dict[str, Any] = {
        "model": entry["id"],
        "matched_by": how,
        "confidence": "id" if how == "id" else "shape",
        "ambiguous_with": others,
        "published": published,
        "notes": entry.get("notes", ""),
        "agree": None,
        "comparison": [],
        "extra_detected": [],
    }
    if result is None:
        return out
    det = {sw.coord: sw for sw in result.super_weights}
    searched = result.thresholds.get("searched_layers")
    matched: set[tuple[int, int, int]] = set()
    all_ok = True
    for sw in entry["super_weights"]:
        coord = (sw["layer"], sw["row"], sw["col"])
        alts = [(a["layer"], a["row"], a["col"]) for a in sw.get("alternatives", [])]
        if coord in det:
            status = "agree"
            matched.add(coord)
        elif any(a in det for a in alts):
            status = "agree_alternative"
            matched.update(a for a in alts if a in det)
        elif searched is not None and sw["layer"] >= searched:
            status = "outside_search"  # beyond max_layer_frac: not looked for
        else:
            status = "missed"
        if status in ("missed", "outside_search"):
            all_ok = False
        item = {"layer": sw["layer"], "row": sw["row"], "col": sw["col"], "status": status}
        if coord in det:
            item["detected_value"] = det[coord].value
        out["comparison"].append(item)
    out["extra_detected"] = [{"layer": c[0], "row": c[1], "col": c[2]} for c in sorted(det) if c not in matched]
    out["agree"] = all_ok
    return out


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------
def format_report(result: DetectionResult) -> str:
    """Human-readable summary of a detection (for the CLI)."""
    th = result.thresholds
    lines = [
        f"Super-weight detection: prompt {result.prompt!r}, {result.iterations} forward pass(es), "
        f"first {th.get('searched_layers', '?')} of {th.get('num_layers', '?')} layers searched",
        f"  criteria: output spike >= {th.get('rel_threshold')}x typical, input spike >= "
        f"{th.get('in_rel_threshold')}x typical, contribution >= {th.get('share_threshold'):.0%} of the output, "
        f"|w| >= {th.get('weight_rel_threshold')}x median|W| or >= {th.get('sa_share_threshold'):.0%} of the SA",
    ]
    if not result.super_weights:
        lines.append("  no super weight found")
    else:
        hdr = (
            f"  {'#':>2} {'module':<34} {'[row, col]':>14} {'value':>11} {'dtype':>8} {'in spike':>10} "
            f"{'out spike':>10} {'conf':>5} {'SA after':>9} {'dloss':>7}"
        )
        lines += [hdr, "  " + "-" * (len(hdr) - 2)]
        for k, sw in enumerate(result.super_weights):
            ab = sw.ablation or {}
            conf = "-" if sw.confirmed is None else ("yes" if sw.confirmed else "no")
            sa = f"{ab['sa_ratio']:.2f}x" if ab.get("sa_ratio") is not None else "-"
            dl = f"{ab['loss_delta']:+.3f}" if ab.get("loss_delta") is not None else "-"
            lines.append(
                f"  {k:>2} {sw.module:<34} {f'[{sw.row}, {sw.col}]':>14} {sw.value:>11.5g} {sw.dtype:>8} "
                f"{sw.input_spike:>10.4g} {sw.output_spike:>10.4g} {conf:>5} {sa:>9} {dl:>7}"
            )
    if result.group_ablation:
        g = result.group_ablation
        lines.append(
            f"  all super weights zeroed: loss {g['loss_base']:.3f} -> {g['loss']:.3f} nats, max |h| "
            f"{g['hidden_max_base']:.4g} -> {g['hidden_max']:.4g}"
        )
    n_ch = sum(len(v["channels"]) for v in result.activation_outliers.values())
    lines.append(
        f"  activation outliers: {n_ch} channel(s) in {len(result.activation_outliers)} Linear input(s) "
        f"(> {th.get('act_rel_threshold')}x median channel and > {th.get('act_floor')})"
    )
    for name, v in sorted(result.activation_outliers.items(), key=lambda kv: -kv[1]["magnitudes"][0])[:8]:
        chans = ", ".join(f"{c}:{m:.3g}" for c, m in zip(v["channels"][:4], v["magnitudes"][:4], strict=True))
        lines.append(f"    {name}: {chans}{' ...' if len(v['channels']) > 4 else ''}")
    pub = result.published
    if pub:
        lines.append(
            f"  published: {pub['model']} (matched by {pub['matched_by']}"
            f"{', ambiguous with ' + ', '.join(pub['ambiguous_with']) if pub['ambiguous_with'] else ''})"
        )
        for c in pub["comparison"]:
            lines.append(f"    L{c['layer']} [{c['row']}, {c['col']}]: {c['status']}")
        if pub["extra_detected"]:
            lines.append(
                "    detected but not published: "
                + ", ".join(f"L{c['layer']} [{c['row']}, {c['col']}]" for c in pub["extra_detected"])
            )
    return "\n".join(lines)
