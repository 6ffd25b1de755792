"""Plots of the detection stage (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Iterable


def _layer_of(sw) -> int:
    return int(sw["layer"] if isinstance(sw, dict) else sw.layer)


def plot_activation_profile(profile: list[dict], path: str, title: str, super_weights: Iterable = ()) -> str:
    """The paper's Figure 3: per layer, the max |down_proj input| and max |down_proj output| (two panels, log
    scale), with the typical channel magnitude for reference and the super-weight layers marked. Returns ``path``.

    ``profile`` is ``DetectionResult.profile`` / ``activation_profile(...)``; ``super_weights`` are SuperWeight
    objects or dicts with a ``layer`` key.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(p["layer"]) for p in profile]
    sw_layers = sorted({_layer_of(sw) for sw in super_weights})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharex=True)
    panels = (("down_in", "max |down_proj input|", "tab:blue"), ("down_out", "max |down_proj output|", "tab:orange"))
    for ax, (key, label, color) in zip(axes, panels, strict=True):
        vals = [abs(float(p[f"{key}_max"])) for p in profile]
        ax.plot(layers, vals, marker="o", ms=3, color=color, label=label)
        if all(f"{key}_typical" in p for p in profile):
            typ = [float(p[f"{key}_typical"]) for p in profile]
            ax.plot(layers, typ, ls="--", lw=1, color="gray", label="typical channel (median of channel max)")
        for j, layer in enumerate(sw_layers):
            ax.axvline(layer, color="red", lw=1, alpha=0.6, label="super-weight layer" if j == 0 else None)
            if layer in layers:
                i = layers.index(layer)
                ch = profile[i][f"{key}_channel"]
                ax.annotate(
                    f"L{layer} ch {ch}",
                    (layer, vals[i]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color="red",
                )
        ax.set_yscale("log")
        positive = [v for v in vals if v > 0]
        if positive:
            ax.set_ylim(top=max(positive) * 6)  # room for the annotations
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
