"""What vLLM's own log says about an engine start: weights memory, KV-cache size and where the time went.

Shared by ``throughput.py`` (``weights_gib`` / ``kv_cache_tokens`` in every record) and ``cold_start.py``.
"""

from __future__ import annotations

import re

PATTERNS = {
    "load_s": r"Model loading took [\d.]+ Gi?B (?:memory )?and ([\d.]+) seconds",
    "weights_gib": r"Model loading took ([\d.]+) Gi?B",
    "compile_s": r"torch\.compile take[s]? ([\d.]+) s in total",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) secs",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) seconds",
    "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
}


def parse_text(text: str) -> dict:
    """The fields above found in ``text`` (largest value; the smallest KV cache over TP/PP ranks), plus the
    ``superweight_rtn W..`` kernel-choice lines and the ``superweight_rtn held-out correction`` line our plugin
    logs."""
    out: dict = {}
    for key, pat in PATTERNS.items():
        m = re.findall(pat, text)
        if m:
            vals = [float(v.replace(",", "")) for v in m]
            out[key] = min(vals) if key == "kv_cache_tokens" else max(vals)
    if "kv_cache_tokens" in out:
        out["kv_cache_tokens"] = int(out["kv_cache_tokens"])
    # our plugin's kernel-choice lines, and kernels/cubin.py's (Humming's symbol reader in place, or given back)
    out["superweight_kernels"] = sorted(
        {
            ln.split("superweight_rtn", 1)[1].lstrip(": ").strip()[:120]
            for ln in text.splitlines()
            if "superweight_rtn W" in ln
            or "superweight_rtn held-out correction" in ln
            or ("superweight_rtn" in ln and "cubin" in ln)
        }
    )
    return out


def parse_file(path: str, offset: int = 0) -> dict:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return parse_text(f.read())
