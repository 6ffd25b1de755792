"""What one prompt's forward pass tells the quantizer (no calibration set): per-input-channel RMS of every
quantized Linear's input, used to weight the grid fit (``grid_weight: prompt``) and to spend the hold-out budget
where the prompt's output error drops most (``holdout_budget: rel_out``).

The prompt is the super-weight detector's (``detect.DEFAULT_PROMPT`` unless ``--prompt`` is given), so a
conversion still runs ONE kind of forward pass on ONE fixed sentence; the sidecar's provenance records it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from ..format import HoldoutBudget, QuantConfig, SuperWeight
from .plan import Plan, quantized_module, resolve_module

# the fit weight of input column c is rms[c]^POWER normalised to mean 1, plus DAMP (no column ignored); chosen on
# Python-docs prose (benchmarks/results/grid_study.md), never on WikiText-2
FIT_POWER, FIT_DAMP = 2.0, 0.1


def needs_prompt(qcfg: QuantConfig) -> bool:
    return str(qcfg.grid_weight) == "prompt" or qcfg.holdout_budget == HoldoutBudget.REL_OUT


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


def holdout_counts(
    qcfg: QuantConfig,
    plan: Plan,
    stream: Iterable[tuple[str, Any]],
    super_weights: dict[str, list[SuperWeight]],
    rms: dict[str, Any] | None,
    device: str,
    log: Callable[..., None],
) -> dict[str, int] | None:
    """Per-matrix hold-out counts spending the uniform total ``sum(ceil(holdout * N * K))`` where the error
    (``holdout_budget``: the prompt's relative output error, or the relative weight error) drops most per held-out
    weight; None for the uniform budget. One extra pass over the weights (min/max grid: the curves rank matrices,
    they need not be the final grid)."""
    if qcfg.holdout_budget == HoldoutBudget.UNIFORM or qcfg.holdout <= 0:
        return None
    from ..grid import allocate_budget, budget_curve

    curves: dict[str, list[tuple[int, float]]] = {}
    total = 0
    for name, t in stream:
        mod = quantized_module(name, tuple(t.shape), plan.ignore)
        if mod is None or mod not in plan.quant:
            continue
        w = t.to(plan.out_dtype)
        if device != "cpu":
            w = w.to(device)
        coords = [(sw.row, sw.col) for sw in super_weights.get(mod, ())] if qcfg.restore_super_weights else []
        metric = qcfg.holdout_budget.value
        curves[mod] = budget_curve(
            w, qcfg.holdout, qcfg.bits, qcfg.layout, extra=coords, metric=metric,
            act=None if rms is None else rms.get(mod), scale_dtype=plan.out_dtype,
        )  # fmt: skip
        total += int(math.ceil(qcfg.holdout * w.numel()))
    counts = allocate_budget(curves, total)
    spent = sum(counts.values())
    log(f"hold-out budget ({qcfg.holdout_budget.value}): {spent:,} of {total:,} weights over {len(counts)} matrices")
    return counts
