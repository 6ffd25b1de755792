"""What one prompt's forward pass tells the quantizer (no calibration set): per-input-channel RMS of every
quantized Linear's input, used to weight the grid fit (``grid_weight: prompt``), to spend the hold-out budget
where the prompt's output error drops most (``holdout_budget: rel_out``) and to rank the weights the hold-out keeps
by ``|w| x rms[col]`` (``holdout_rank: prompt``).

The prompt is the super-weight detector's (``detect.DEFAULT_PROMPT`` unless ``--prompt`` is given), so a
conversion still runs ONE kind of forward pass on ONE fixed sentence; the sidecar's provenance records it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from ..format import HoldoutBudget, HoldoutRank, QuantConfig, SuperWeight, matches_any
from .errors import ConversionError
from .plan import Plan, quantized_module, resolve_module

# the fit weight of input column c is rms[c]^POWER normalised to mean 1, plus DAMP (no column ignored); chosen on
# Python-docs prose (benchmarks/results/grid_study.md), never on WikiText-2
FIT_POWER, FIT_DAMP = 2.0, 0.1


def needs_prompt(qcfg: QuantConfig) -> bool:
    return (
        str(qcfg.grid_weight) == "prompt"
        or qcfg.holdout_budget == HoldoutBudget.REL_OUT
        or (ranks_by_prompt(qcfg) and qcfg.holdout > 0)
    )


def ranks_by_prompt(qcfg: QuantConfig) -> bool:
    return qcfg.holdout_rank == HoldoutRank.PROMPT


def input_rms(model: Any, tokenizer: Any, prompt: str, plan: Plan) -> dict[str, Any]:
    """{checkpoint module: input RMS [K] without the first token (the attention-sink token carries the massive
    activations)} for every quantized Linear, from one forward pass of ``model`` on ``prompt``."""
    import torch

    from ..grid import prompt_input_rms

    linears: dict[str, Any] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            ck = resolve_module(name, plan.quant)
            if ck is not None:
                linears[ck] = mod
    stats = prompt_input_rms(model, tokenizer, prompt, linears)
    return {mod: s["skip_first"] for mod, s in stats.items()}


def fit_weight(qcfg: QuantConfig, rms: dict[str, Any] | None, mod: str) -> Any:
    """The per-input-column weight of ``mod``'s grid fit, or None (weights only)."""
    if str(qcfg.grid_weight) != "prompt" or rms is None or mod not in rms:
        return None
    from ..grid import fit_weight_from_rms

    return fit_weight_from_rms(rms[mod], FIT_POWER, FIT_DAMP)


def holdout_scale(qcfg: QuantConfig, rms: dict[str, Any] | None, mod: str) -> Any:
    """The per-input-column factor [K] of ``mod``'s hold-out ranking (``select_holdout(col_scale=...)``: the
    prompt's input RMS), or None (rank by |w|)."""
    if not ranks_by_prompt(qcfg) or rms is None:
        return None
    return rms.get(mod)


def missing_rms(qcfg: QuantConfig, rms: dict[str, Any] | None, plan: Plan) -> list[str]:
    """Quantized modules the prompt's forward pass did not reach although the config needs their input RMS
    (their fit / hold-out ranking fall back to the weights alone)."""
    if rms is None or not needs_prompt(qcfg):
        return []
    return sorted(m for m in plan.quant if m not in rms)


def holdout_counts(
    qcfg: QuantConfig,
    plan: Plan,
    stream: Iterable[tuple[str, Any]],
    super_weights: dict[str, list[SuperWeight]],
    rms: dict[str, Any] | None,
    device: str,
    log: Callable[..., None],
) -> dict[str, int] | None:
    """Per-matrix hold-out counts, or None for the uniform fraction of every matrix. The total is always
    ``sum(ceil(holdout * N * K))`` over ALL quantized matrices. ``holdout_modules`` restricts where it is spent
    (the others get 0: super weights only); ``holdout_budget`` other than uniform spends it where the error (the
    prompt's relative output error, or the relative weight error) drops most per held-out weight -- one extra pass
    over the weights (min/max grid: the curves rank matrices, they need not be the final grid); each curve holds
    out the weights ``holdout_rank`` picks. Without a budget the chosen matrices share the total by size."""
    if qcfg.holdout <= 0 or (qcfg.holdout_budget == HoldoutBudget.UNIFORM and not qcfg.holdout_modules):
        return None
    total = sum(int(math.ceil(qcfg.holdout * n * k)) for n, k in plan.quant.values())
    all_size = sum(n * k for n, k in plan.quant.values())
    chosen = [m for m in plan.quant if not qcfg.holdout_modules or matches_any(m, qcfg.holdout_modules)]
    if not chosen:
        raise ConversionError(
            f"holdout_modules {','.join(qcfg.holdout_modules)}: no quantized matrix matches (e.g. "
            f"{', '.join(sorted(plan.quant)[:3])}); name the matrices with --holdout-modules, or 'all' for every one"
        )
    size = sum(plan.quant[m][0] * plan.quant[m][1] for m in chosen)
    where = f" in {len(chosen)} of {len(plan.quant)} matrices ({','.join(qcfg.holdout_modules)})"
    if qcfg.holdout_budget == HoldoutBudget.UNIFORM:
        counts = {m: 0 for m in plan.quant}
        for m in chosen:
            n, k = plan.quant[m]
            counts[m] = min(int(round(total * n * k / size)), n * k // 4)
        log(f"hold-out: {sum(counts.values()):,} of {total:,} weights{where}")
        return counts
    from ..grid import allocate_budget, budget_curve

    # the chosen matrices' curves span multiples of their share of the total (the whole total when all are chosen)
    frac = min(qcfg.holdout * all_size / size, 0.25)
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, t in stream:
        mod = quantized_module(name, tuple(t.shape), plan.ignore)
        if mod is None or mod not in plan.quant or mod not in chosen:
            continue
        w = t.to(plan.out_dtype)
        if device != "cpu":
            w = w.to(device)
        coords = [(sw.row, sw.col) for sw in super_weights.get(mod, ())] if qcfg.restore_super_weights else []
        metric = qcfg.holdout_budget.value
        curves[mod] = budget_curve(
            w, frac, qcfg.bits, qcfg.layout, extra=coords, metric=metric,
            act=None if rms is None else rms.get(mod), scale_dtype=plan.out_dtype,
            col_scale=holdout_scale(qcfg, rms, mod),
        )  # fmt: skip
    counts = {m: 0 for m in plan.quant}
    counts.update(allocate_budget(curves, total))
    spent = sum(counts.values())
    log(f"hold-out budget ({qcfg.holdout_budget.value}): {spent:,} of {total:,} weights over {len(curves)} matrices")
    return counts
