"""Tiny random Llama models with a PLANTED super weight (+ the massive activation it creates), for fast tests.

A super weight is planted the way the paper describes the mechanism: the SwiGLU product ``silu(gate) * up`` of one
intermediate channel ``col`` spikes on some token (the *input spike* of ``down_proj``), and one very large weight
``down_proj.weight[row, col]`` turns that spike into a *super activation* in the residual channel ``row``.

The spike is made by pointing ``gate_proj.weight[col]`` and ``up_proj.weight[col]`` along the MLP input of the
triggering token(s), so that ``gate = up = s`` there and ``x[t, col] = silu(s) * s``:

* ``trigger="bos"``: only position 0 holding the BOS token (what real models do: the SA sits on the first token).
  With causal attention the position-0 state depends on the BOS embedding only, so the spike is exact and the same
  for every prompt that starts with BOS (``TinyTokenizer`` always prepends it).
* ``trigger="all"``: every token, for any tokenizer (a constant direction is added to all embeddings so that every
  token's MLP input points the same way). Use this with a foreign tokenizer (e.g. SmolLM2's, ``vocab_size=49152``).

Everything is deterministic for a given seed (weights are drawn from a private ``torch.Generator``).
"""

from __future__ import annotations

import torch

BOS_ID = 1
EOS_ID = 2


class TinyTokenizer:
    """Byte-level tokenizer (id = byte + 3) that prepends BOS; enough for ``tokenizer(text, return_tensors="pt")``."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = 0

    def __init__(self, vocab_size: int = 259) -> None:
        if vocab_size < 259:
            raise ValueError("TinyTokenizer needs vocab_size >= 259 (3 specials + 256 bytes)")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [BOS_ID] + [b + 3 for b in text.encode("utf-8")]

    def __call__(self, text: str, return_tensors: str | None = "pt", **_: object) -> dict:
        ids = self.encode(text)
        if return_tensors != "pt":
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        t = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": t, "attention_mask": torch.ones_like(t)}

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def _mlp_inputs(model, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """MLP input (post-attention-norm hidden state) of decoder layer ``layer``: [tokens, hidden], fp32."""
    got: dict[str, torch.Tensor] = {}
    mlp = model.model.layers[layer].mlp
    h = mlp.register_forward_pre_hook(lambda m, args: got.__setitem__("x", args[0].detach().float()))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        h.remove()
    return got["x"].reshape(-1, got["x"].shape[-1])


def _trigger_direction(model, layer: int, trigger: str, vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    """The MLP input of layer ``layer`` that the spike must respond to (mean over the triggering tokens)."""
    if trigger == "bos":
        x = _mlp_inputs(model, layer, torch.tensor([[BOS_ID]]))
        return x[0]
    ids = torch.randint(3, vocab_size, (1, 24), generator=gen)
    return _mlp_inputs(model, layer, ids).mean(0)


def _plant_spike(model, layer: int, col: int, direction: torch.Tensor, s: float) -> None:
    """Make intermediate channel ``col`` of layer ``layer`` fire ``act(s) * s`` on inputs along ``direction``."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: fused [gate; up]
            w = mlp.gate_up_proj.weight
            v = (s * direction / direction.pow(2).sum()).to(w.dtype)
            half = w.shape[0] // 2
            w[col] = v
            w[half + col] = v
        else:
            v = (s * direction / direction.pow(2).sum()).to(mlp.gate_proj.weight.dtype)
            mlp.gate_proj.weight[col] = v
            mlp.up_proj.weight[col] = v


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "gemma3_text")


def _config(arch: str, **kw):
    """A tiny transformers config of ``arch`` with the given shape."""
    import transformers as tf

    common = dict(
        vocab_size=kw["vocab_size"],
        hidden_size=kw["hidden"],
        intermediate_size=kw["intermediate"],
        num_hidden_layers=kw["num_layers"],
        num_attention_heads=kw["heads"],
        num_key_value_heads=kw["kv_heads"],
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    head_dim = kw["hidden"] // kw["heads"]
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=head_dim)
    if arch == "olmo":
        return tf.OlmoConfig(**common)
    if arch == "olmo2":
        return tf.Olmo2Config(**common)
    if arch == "phi3":
        return tf.Phi3Config(**common, original_max_position_embeddings=256)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=64)
    raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")


def build_tiny_model(arch: str = "llama", **kw):
    """``build_tiny_llama`` for another decoder architecture (see ARCHS); same keyword arguments."""
    return build_tiny_llama(arch=arch, **kw)


def build_tiny_llama(
    *,
    arch: str = "llama",
    seed: int = 0,
    num_layers: int = 6,
    hidden: int = 64,
    intermediate: int = 176,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 259,
    super_weights: tuple[tuple[int, int, int], ...] = ((1, 13, 37),),
    sw_value: float = 2.5,
    spike: float = 6.0,
    trigger: str = "bos",
    sa_norm_gain: float = 1.0,
    echo: dict | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A deterministic tiny ``LlamaForCausalLM`` (or another ``arch`` of ARCHS) with planted super weights.

    super_weights: ``(layer, row, col)`` triples, planted as ``down_proj.weight[row, col] = ±sw_value`` plus an input
        spike ``act(spike) * spike`` on channel ``col`` (siblings sharing a row or a column are fine; the signs are
        chosen so that contributions to a shared row add up).
    trigger: "bos" (position 0 holding BOS, as TinyTokenizer produces; prompt-independent) or "all" (every token,
        for any tokenizer).
    sa_norm_gain: multiplies the (Llama-style) norm weights of every SA channel ``row`` in the layers after the SW
        layer. A one-hot hidden state normalises to sqrt(hidden) (8 here, 64 in a 4096-wide model); the gain
        emulates that wide-model ratio so that the SA channel is an activation outlier of the next layers'
        q/k/v/gate/up inputs.
    echo: a late-layer output spike that is NOT a super weight, planted after the super weights:
        ``{"layer": L, "row": r, "kind": "distributed"}`` (a large output summed from many moderate inputs, like
        Llama-7B's layer 30) or ``{"layer": L, "row": r, "col": c, "kind": "eraser"}`` (one large weight times a
        real input spike that cancels the super activation, like SmolLM2-135M's layer 28).
    """
    from transformers import AutoModelForCausalLM

    if trigger not in ("bos", "all"):
        raise ValueError("trigger must be 'bos' or 'all'")
    cfg = _config(
        arch,
        vocab_size=vocab_size,
        hidden=hidden,
        intermediate=intermediate,
        num_layers=num_layers,
        heads=heads,
        kv_heads=kv_heads,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    unit_norm = 0.0 if arch.startswith("gemma") else 1.0  # Gemma's RMSNorm scales by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(unit_norm)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.initializer_range)
        if trigger == "all":
            d = torch.randn(hidden, generator=gen)
            model.model.embed_tokens.weight += d / d.norm()  # a constant direction that dominates every token

    sa_rows: dict[int, int] = {}  # row -> sign of its super activation
    for layer, row, col in sorted(super_weights):
        direction = _trigger_direction(model, layer, trigger, vocab_size, gen)
        _plant_spike(model, layer, col, direction, spike)  # x[t, col] = act(s) * s > 0
        sign = sa_rows.setdefault(row, 1 if (row + col) % 2 == 0 else -1)
        with torch.no_grad():
            model.model.layers[layer].mlp.down_proj.weight[row, col] = sign * sw_value
    if sa_norm_gain != 1.0 and super_weights:
        first = min(layer for layer, _, _ in super_weights)
        with torch.no_grad():
            for i in range(first + 1, num_layers):
                for row in sa_rows:
                    for norm in ("input_layernorm", "post_attention_layernorm"):
                        w = getattr(getattr(model.model.layers[i], norm, None), "weight", None)
                        if w is not None:
                            w[row] *= sa_norm_gain
    if echo is not None:
        _plant_echo(model, echo, trigger, vocab_size, sa_rows, gen)
    return model.to(dtype)


def _plant_echo(
    model, echo: dict, trigger: str, vocab_size: int, sa_rows: dict[int, int], gen: torch.Generator
) -> None:
    layer, row, kind = int(echo["layer"]), int(echo["row"]), echo.get("kind", "distributed")
    mlp = model.model.layers[layer].mlp
    direction = _trigger_direction(model, layer, trigger, vocab_size, gen)
    sign = -sa_rows.get(row, 1)  # an echo opposes the super activation (it is what erases it late in the model)
    with torch.no_grad():
        if kind == "distributed":
            n = int(echo.get("n", 48))
            cols = torch.randperm(mlp.down_proj.weight.shape[1], generator=gen)[:n]
            for c in cols.tolist():
                _plant_spike(model, layer, c, direction, float(echo.get("spike", 2.5)))
                mlp.down_proj.weight[row, c] = sign * float(echo.get("weight", 1.0))
        elif kind == "eraser":
            col = int(echo["col"])
            _plant_spike(model, layer, col, direction, float(echo.get("spike", 6.0)))
            mlp.down_proj.weight[row, col] = sign * float(echo.get("weight", 4.0))
        else:
            raise ValueError(f"unknown echo kind {kind!r}")


def save_tiny_hf(
    path: str,
    tokenizer_dir: str,
    *,
    seed: int = 0,
    hidden: int = 128,
    intermediate: int = 384,
    num_layers: int = 2,
    vocab_size: int = 49152,
) -> str:
    """A tiny random bf16 Llama saved as an HF directory with the tokenizer files of ``tokenizer_dir`` (e.g.
    SmolLM2's): small enough for a fast vLLM engine on the CPU, a real tokenizer for the text paths."""
    import os
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), path)
    return path
