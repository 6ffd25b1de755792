"""Load-time bookkeeping of the plugin (vllm_plugin/loading.py) on fake vLLM layers: which held-out entries each
tensor-parallel rank keeps and where they land in its fused output, duplicate / missing-tensor refusals.

The end-to-end TP checks (TP 2 == TP 1 on real engines) are in tests/test_plugin.py; these pin the index
arithmetic itself against an independent dense reference.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

from vllm_superweight.format import FormatError  # noqa: E402
from vllm_superweight.vllm_plugin import loading  # noqa: E402


def fake(cls, **attrs):
    """An instance of vLLM's layer class without running its constructor (no distributed state needed)."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    for k, v in attrs.items():
        object.__setattr__(layer, k, v)
    layer._sw_stash = {}
    return layer


def entries(n, k, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n * k, generator=g)[:nnz]
    return torch.stack([flat // k, flat % k]).to(torch.int32), torch.randn(nnz, generator=g)


def dense(rows, cols, vals, n, k):
    d = torch.zeros(n, k)
    d[rows.long(), cols.long()] = vals
    return d


def stash(layer, by_shard):
    layer._sw_stash = {
        "sparse_index": {s: i for s, (i, _) in by_shard.items()},
        "sparse_value": {s: v for s, (_, v) in by_shard.items()},
    }


@pytest.mark.parametrize("tp,total_kv", [(1, 2), (2, 2), (2, 1), (4, 2)])
def test_qkv_entries_land_in_the_rank_slice_of_the_fused_output(tp, total_kv):
    heads, hd, k = 4, 8, 24
    sizes = {"q": heads * hd, "k": total_kv * hd, "v": total_kv * hd}
    shards = {s: entries(n, k, 40, seed=i) for i, (s, n) in enumerate(sizes.items())}
    full = {s: dense(i[0], i[1], v, sizes[s], k) for s, (i, v) in shards.items()}
    for rank in range(tp):
        kv_local = max(1, total_kv // tp)
        replicas = max(1, tp // total_kv)
        layer = fake(
            QKVParallelLinear,
            prefix="qkv",
            tp_rank=rank,
            tp_size=tp,
            num_heads=heads // tp,
            num_kv_heads=kv_local,
            head_size=hd,
            v_head_size=hd,
            num_kv_head_replicas=replicas,
            input_size=k,
            output_sizes=[sizes["q"], sizes["k"], sizes["v"]],
            output_size_per_partition=(heads // tp + 2 * kv_local) * hd,
            input_size_per_partition=k,
        )
        stash(layer, shards)
        r, c, v = loading.finalize_sparse(layer, lambda sid: sizes[sid])
        got = dense(r, c, v, layer.output_size_per_partition, k)
        q_rows = heads // tp * hd
        kv_rows = kv_local * hd
        kv_rank = rank // replicas
        want = torch.cat(
            [
                full["q"][rank * q_rows : (rank + 1) * q_rows],
                full["k"][kv_rank * kv_rows : (kv_rank + 1) * kv_rows],
                full["v"][kv_rank * kv_rows : (kv_rank + 1) * kv_rows],
            ]
        )
        assert torch.equal(got, want), (tp, rank)


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_gate_up_and_row_parallel_down(tp):
    inter, hidden = 32, 16
    gate, up = entries(inter, hidden, 30, 1), entries(inter, hidden, 30, 2)
    down = entries(hidden, inter, 50, 3)
    for rank in range(tp):
        mlp = fake(
            MergedColumnParallelLinear,
            prefix="gate_up",
            tp_rank=rank,
            tp_size=tp,
            input_size=hidden,
            output_sizes=[inter, inter],
            output_size_per_partition=2 * inter // tp,
            input_size_per_partition=hidden,
        )
        stash(mlp, {0: gate, 1: up})
        got = dense(*loading.finalize_sparse(mlp, lambda sid: inter), 2 * inter // tp, hidden)
        w = inter // tp
        want = torch.cat(
            [
                dense(*gate[0], gate[1], inter, hidden)[rank * w : (rank + 1) * w],
                dense(*up[0], up[1], inter, hidden)[rank * w : (rank + 1) * w],
            ]
        )
        assert torch.equal(got, want)
        row = _row_layer(rank, tp, inputs=inter, outputs=hidden)
        stash(row, {None: down})
        got = dense(*loading.finalize_sparse(row, lambda sid: hidden), hidden, inter // tp)
        # row-parallel: the rank owning input column c keeps the entry (before the all-reduce); rows are global
        assert torch.equal(
            got, dense(*down[0], down[1], hidden, inter)[:, rank * inter // tp : (rank + 1) * inter // tp]
        )


def _row_layer(rank=0, tp=1, inputs=16, outputs=8):
    return fake(
        RowParallelLinear,
        prefix="model.layers.0.mlp.down_proj",
        tp_rank=rank,
        tp_size=tp,
        input_size=inputs,
        output_size=outputs,
        output_size_per_partition=outputs,
        input_size_per_partition=inputs // tp,
    )


@pytest.mark.parametrize(
    "case,msg",
    [
        ("duplicate", "same \\(row, col\\) more than once"),
        ("out_of_range", "outside its matrix"),
        ("negative", "outside its matrix"),
        ("nan", "NaN"),
        ("short", "malformed"),
        ("no_values", "not both present"),
    ],
)
def test_bad_sparse_entries_are_refused(case, msg):
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    val = torch.tensor([0.5, -1.0, 2.0])
    if case == "duplicate":
        idx[:, 2] = idx[:, 0]
    elif case == "out_of_range":
        idx[0, 1] = 8
    elif case == "negative":
        idx[1, 0] = -1
    elif case == "nan":
        val[1] = float("nan")
    elif case == "short":
        val = val[:2]
    layer = _row_layer()
    stash(layer, {None: (idx, val)})
    if case == "no_values":
        layer._sw_stash["sparse_value"] = {}
    with pytest.raises(FormatError, match=msg):
        loading.finalize_sparse(layer, lambda sid: 8)


def test_every_registered_parameter_must_be_loaded():
    qkv = fake(QKVParallelLinear, prefix="model.layers.0.self_attn.qkv_proj")
    for name in ("weight_packed", "weight_scale"):
        for s in "qkv":
            loading.mark_loaded(qkv, name, s)
    loading.mark_loaded(qkv, "weight_zero_point", "q")
    loading.mark_loaded(qkv, "weight_zero_point", "k")
    loading.check_loaded(qkv, "qkv", ["weight_packed", "weight_scale"])
    with pytest.raises(FormatError, match=r"qkv\.weight_zero_point: missing from the checkpoint \(shards v\)"):
        loading.check_loaded(qkv, "qkv", ["weight_packed", "weight_zero_point"])
    with pytest.raises(FormatError, match=r"qkv\.weight_shape: missing from the checkpoint;"):
        loading.check_loaded(qkv, "qkv", ["weight_shape"])
    fused = fake(QKVParallelLinear, prefix="phi3 qkv stored fused on disk")
    loading.mark_loaded(fused, "weight_packed", None)
    loading.check_loaded(fused, "qkv", ["weight_packed"])
    down = _row_layer()
    loading.mark_loaded(down, "weight_packed", None)
    loading.check_loaded(down, "down", ["weight_packed"])
    with pytest.raises(FormatError, match="down.weight_scale"):
        loading.check_loaded(down, "down", ["weight_packed", "weight_scale"])


@pytest.mark.parametrize("bits,k", [(4, 64), (8, 64), (3, 64), (4, 36)])
def test_weight_for_kernel_equals_the_unpack_repack_round_trip(bits, k):
    """The pass-through of packed weights whose packing the kernel shares is exactly the round trip it replaced,
    and a tensor of the wrong shape is still refused with the format's message."""
    from vllm_superweight.format import BlockLayout
    from vllm_superweight.quantize import pack_codes, unpack_codes

    n = 24
    spec = loading.LinearSpec("model.layers.0.mlp.down_proj", bits, BlockLayout.parse("channel"), False, k)
    g = torch.Generator().manual_seed(bits * 100 + k)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    w = pack_codes(torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8), bits, 1)
    ref = pack_codes(unpack_codes(w, bits, (n, k), 1), loading.kernel_bits(bits), 1)
    assert torch.equal(spec.weight_for_kernel(w, n), ref)
    with pytest.raises(FormatError, match="weight_packed"):
        spec.weight_for_kernel(w[:, :-1].contiguous(), n)
    with pytest.raises(FormatError, match="weight_packed"):
        spec.weight_for_kernel(w.to(torch.int64), n)


@pytest.mark.parametrize("tp", [1, 2])
def test_sidecar_outlier_channels_per_module_and_rank(tp):
    """Weight-only checkpoints list their activation-outlier channels in the sidecar only (for
    ``SUPERWEIGHT_CPU_W4A8``): a fused module gets the union of its parts' channels (they share one input), a
    row-parallel rank only the channels of its input window, in local coordinates."""
    from vllm_superweight.vllm_plugin.config import SuperWeightRTNConfig

    cfg = SuperWeightRTNConfig()
    cfg.act_outliers_by_module = {
        "model.layers.0.self_attn.q_proj": (471, 12),
        "model.layers.0.self_attn.k_proj": (471,),
        "model.layers.0.self_attn.v_proj": (3,),
        "model.layers.0.mlp.down_proj": (1194, 196, 5),
        "model.layers.1.mlp.up_proj": (9,),
    }
    assert cfg.act_outliers_for("model.layers.0.self_attn.qkv_proj") == [3, 12, 471]
    assert cfg.act_outliers_for("model.layers.0.self_attn.o_proj") == []
    assert cfg.act_outliers_for("model.layers.1.mlp.gate_up_proj") == [9]
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_proj"]}  # the model's own mapping wins
    assert cfg.act_outliers_for("model.layers.1.mlp.gate_up_proj") == []
    chans = torch.tensor(cfg.act_outliers_for("model.layers.0.mlp.down_proj"))
    inter = 1536
    got = []
    for rank in range(tp):
        row = _row_layer(rank, tp, inputs=inter, outputs=576)
        local = loading.local_channels(row, chans)
        assert bool(((local >= 0) & (local < inter // tp)).all())
        got += (local + rank * inter // tp).tolist()
    assert sorted(got) == [5, 196, 1194]  # each channel on exactly one rank
    with pytest.raises(FormatError, match="outside"):
        loading.local_channels(row, torch.tensor([inter]))
