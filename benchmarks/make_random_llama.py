#!/usr/bin/env python3
"""Write random-weight Llama-shaped checkpoints for throughput runs (generated on the GPU when there is one).

    python benchmarks/make_random_llama.py --out DIR --tokenizer-dir TOK [--formats bf16,awq,smoothquant]
        [--shape llama2-7b|tiny] [--vocab 49152] [--plant] [--sw-layer 1 --sw-row 2533 --sw-col 7890 --sw-value -2.0]

* ``DIR/bf16``: HF Llama checkpoint in bf16 (weights ~ N(0, 0.02), norms 1), sharded safetensors + index.
  ``--plant`` plants a super weight the way the paper describes one: ``layers[L].mlp.down_proj[row, col]`` is set
  to a large value and rows ``col`` of that layer's gate/up projections are scaled up, so that input channel
  ``col`` of down_proj carries a massive activation and the product lands a super activation in hidden channel
  ``row`` of the residual stream (a data-driven detector finds it). The coordinates go to
  ``DIR/bf16/planted_super_weights.json`` (the superweights.json sidecar's lists: ``super_weights`` and the
  ``activation_outliers`` such a model shows), which ``superweight convert --super-weights`` takes.
* ``DIR/awq``: compressed-tensors W4A16 asymmetric g128 ``pack-quantized`` (what llm-compressor's AWQ writes).
* ``DIR/smoothquant``: compressed-tensors W8A8 int8 ``int-quantized``, per-channel weights, dynamic per-token
  activations (what SmoothQuant + GPTQ recipes write).
  The quantized checkpoints hold random codes of the right shapes and dtypes (speed does not depend on values).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import SHAPES  # noqa: E402

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    h, i, hd = s["hidden"], s["inter"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * hd
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def base_config(s: dict, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
    }


class ShardWriter:
    """Accumulates tensors and writes ~``shard_bytes`` safetensors shards plus the index."""

    def __init__(self, out: str, shard_bytes: int = 4 << 30):
        from safetensors.torch import save_file

        self.save_file = save_file
        self.out, self.limit = out, shard_bytes
        self.cur: dict[str, torch.Tensor] = {}
        self.cur_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0
        os.makedirs(out, exist_ok=True)

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        self.cur[name] = t
        self.cur_bytes += t.numel() * t.element_size()
        if self.cur_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.cur:
            return
        fn = f"model-{len(self.files) + 1:05d}.safetensors"
        self.save_file(self.cur, os.path.join(self.out, fn), metadata={"format": "pt"})
        self.files.append((fn, list(self.cur)))
        self.total += self.cur_bytes
        self.cur, self.cur_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (fn, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out, fn), os.path.join(self.out, final))
            weight_map.update({k: final for k in names})
        with open(os.path.join(self.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=1)


def copy_tokenizer(tok_dir: str, out: str) -> None:
    if not tok_dir or not os.path.isdir(tok_dir):
        raise SystemExit(
            f"--tokenizer-dir {tok_dir!r} is not a directory (needs tokenizer.json & tokenizer_config.json)"
        )
    for fn in os.listdir(tok_dir):
        if fn.endswith((".safetensors", ".bin", ".gguf")) or fn == "config.json":
            continue
        p = os.path.join(tok_dir, fn)
        if os.path.isfile(p):
            shutil.copy(p, out)


def common_tensors(w: ShardWriter, s: dict, vocab: int, gen, dev) -> None:
    h = s["hidden"]
    w.add("model.embed_tokens.weight", (torch.randn(vocab, h, generator=gen, device=dev) * 0.02).to(torch.bfloat16))
    w.add("lm_head.weight", (torch.randn(vocab, h, generator=gen, device=dev) * 0.02).to(torch.bfloat16))
    w.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16, device=dev))


def layer_norms(w: ShardWriter, s: dict, l: int, dev) -> None:
    h = s["hidden"]
    w.add(f"model.layers.{l}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16, device=dev))
    w.add(f"model.layers.{l}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16, device=dev))


def write_bf16(out: str, s: dict, vocab: int, args, dev) -> None:
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    w = ShardWriter(out)
    common_tensors(w, s, vocab, gen, dev)
    shapes = linear_shapes(s)
    planted = None
    for l in range(s["layers"]):
        for nm in LINEARS:
            n, k = shapes[nm]
            t = torch.randn(n, k, generator=gen, device=dev) * 0.02
            if args.plant and l == args.sw_layer:
                if nm in ("mlp.gate_proj", "mlp.up_proj"):
                    t[args.sw_col] *= args.sw_input_gain  # massive input channel of down_proj
                if nm == "mlp.down_proj":
                    t[args.sw_row, args.sw_col] = args.sw_value
            t = t.to(torch.bfloat16)
            if args.plant and l == args.sw_layer and nm == "mlp.down_proj":
                planted = float(t[args.sw_row, args.sw_col])
            w.add(f"model.layers.{l}.{nm}.weight", t)
        layer_norms(w, s, l, dev)
        if l % 8 == 7 or l == s["layers"] - 1:
            log(f"  bf16: layers 0..{l} generated")
    w.close()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(base_config(s, vocab), f, indent=1)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    copy_tokenizer(args.tokenizer_dir, out)
    if args.plant:
        write_planted(out, s, args, planted)
    log(f"wrote {out} ({w.total / 1e9:.1f} GB)")


def write_planted(out: str, s: dict, args, value: float) -> None:
    import struct

    L, row, col = args.sw_layer, args.sw_row, args.sw_col
    sw = {
        "module": f"model.layers.{L}.mlp.down_proj",
        "layer": L,
        "row": row,
        "col": col,
        "value": value,
        "bits": struct.pack(">f", value).hex()[:4],
        "dtype": "bfloat16",
        "confirmed": True,
        "restored": True,
        "planted": True,
    }
    outliers = [{"module": f"model.layers.{L}.mlp.down_proj", "channels": [col]}]
    for l in range(L + 1, s["layers"]):  # the super activation rides the residual stream into later layers
        for nm in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            outliers.append({"module": f"model.layers.{l}.{nm}", "channels": [row]})
    data = {
        "format_version": "1.0",
        "super_weights": [sw],
        "activation_outliers": outliers,
        "provenance": {
            "tool": "benchmarks/make_random_llama.py",
            "planted": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }
    with open(os.path.join(out, "planted_super_weights.json"), "w") as f:
        json.dump(data, f, indent=1)


def ct_config(s: dict, vocab: int, kind: str) -> dict:
    cfg = base_config(s, vocab)
    if kind == "awq":
        wq = {
            "num_bits": 4,
            "type": "int",
            "symmetric": False,
            "strategy": "group",
            "group_size": 128,
            "dynamic": False,
            "observer": "minmax",
        }
        aq, fmt = None, "pack-quantized"
    else:
        wq = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "channel",
            "group_size": None,
            "dynamic": False,
            "observer": "minmax",
        }
        aq = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "group_size": None,
            "dynamic": True,
            "observer": None,
        }
        fmt = "int-quantized"
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": wq,
                "input_activations": aq,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    return cfg


def write_ct(out: str, s: dict, vocab: int, kind: str, args, dev) -> None:
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    w = ShardWriter(out)
    common_tensors(w, s, vocab, gen, dev)
    shapes = linear_shapes(s)

    def rnd_i32(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int64, device=dev, generator=gen).to(torch.int32)

    for l in range(s["layers"]):
        for nm in LINEARS:
            n, k = shapes[nm]
            p = f"model.layers.{l}.{nm}"
            if kind == "awq":
                g = 128
                w.add(p + ".weight_packed", rnd_i32(n, k // 8))
                w.add(
                    p + ".weight_scale",
                    (torch.rand(n, k // g, device=dev, generator=gen) * 0.01 + 0.001).to(torch.bfloat16),
                )
                w.add(p + ".weight_zero_point", rnd_i32(n // 8, k // g))
                w.add(p + ".weight_shape", torch.tensor([n, k], dtype=torch.int64))
            else:
                w.add(p + ".weight", torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev, generator=gen))
                w.add(
                    p + ".weight_scale", (torch.rand(n, 1, device=dev, generator=gen) * 1e-3 + 1e-4).to(torch.bfloat16)
                )
        layer_norms(w, s, l, dev)
    w.close()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(ct_config(s, vocab, kind), f, indent=1)
    copy_tokenizer(args.tokenizer_dir, out)
    log(f"wrote {out} ({w.total / 1e9:.1f} GB)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="parent directory; writes OUT/bf16, OUT/awq, OUT/smoothquant")
    ap.add_argument("--tokenizer-dir", default=os.environ.get("TOKENIZER_DIR", ".gpu-bundle/tok"))
    ap.add_argument("--formats", default="bf16,awq,smoothquant")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plant", action="store_true", help="plant a super weight (see the module docstring)")
    ap.add_argument("--sw-layer", type=int, default=1)
    ap.add_argument("--sw-row", type=int, default=2533)
    ap.add_argument("--sw-col", type=int, default=7890)
    ap.add_argument("--sw-value", type=float, default=-2.0)
    ap.add_argument("--sw-input-gain", type=float, default=8.0)
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    s = SHAPES[args.shape]
    if args.plant:
        shp = linear_shapes(s)["mlp.down_proj"]
        if not (0 <= args.sw_layer < s["layers"] and 0 <= args.sw_row < shp[0] and 0 <= args.sw_col < shp[1]):
            args.sw_layer, args.sw_row, args.sw_col = (
                min(args.sw_layer, s["layers"] - 1),
                args.sw_row % shp[0],
                args.sw_col % shp[1],
            )
            log(
                f"super weight moved inside the {args.shape} shape: "
                f"layer {args.sw_layer} [{args.sw_row}, {args.sw_col}]"
            )
    dev = torch.device(args.device)
    log(f"shape {args.shape} {s}, vocab {args.vocab}, device {dev}, formats {args.formats}")
    for kind in [f.strip() for f in args.formats.split(",") if f.strip()]:
        out = os.path.join(args.out, kind)
        if os.path.exists(os.path.join(out, "config.json")) and not args.force:
            log(f"{out} exists; kept (use --force to rewrite)")
            continue
        if os.path.exists(out):
            shutil.rmtree(out)
        if kind == "bf16":
            write_bf16(out, s, args.vocab, args, dev)
        elif kind in ("awq", "smoothquant"):
            write_ct(out, s, args.vocab, kind, args, dev)
        else:
            raise SystemExit(f"unknown format {kind!r} (bf16, awq, smoothquant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
