"""Per-batch W4 kernel choice (kernels/w4_dispatch.py): knob parsing, parameter cloning, dispatch rule.

The real Marlin/Machete pair runs in tests/test_gpu_kernels.py (GPU); here the dispatch logic is checked with
two recording kernels that repack their weights differently, as Marlin and Machete do.
"""

from __future__ import annotations

import pytest
import torch

from vllm_superweight.kernels import w4_dispatch as W


def test_knobs(monkeypatch):
    monkeypatch.delenv("SUPERWEIGHT_W4_KERNEL", raising=False)
    monkeypatch.delenv("SUPERWEIGHT_MARLIN_MAX_M", raising=False)
    assert W.kernel_mode() == "auto" and W.marlin_max_m() == W.DEFAULT_MARLIN_MAX_M
    monkeypatch.setenv("SUPERWEIGHT_W4_KERNEL", "Machete")
    monkeypatch.setenv("SUPERWEIGHT_MARLIN_MAX_M", "16")
    assert W.kernel_mode() == "machete" and W.marlin_max_m() == 16
    monkeypatch.setenv("SUPERWEIGHT_W4_KERNEL", "exllama")
    with pytest.raises(ValueError, match="SUPERWEIGHT_W4_KERNEL"):
        W.kernel_mode()
    monkeypatch.setenv("SUPERWEIGHT_MARLIN_MAX_M", "many")
    with pytest.raises(ValueError, match="not an integer"):
        W.marlin_max_m()


def test_clone_keeps_the_vllm_parameter_class_and_layout():
    pytest.importorskip("vllm")
    from vllm_superweight.kernels import vllm_linear as VL

    VL._patch_tp_single_process()
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

    p = PackedvLLMParameter(data=torch.arange(12, dtype=torch.int32).view(3, 4), input_dim=1, output_dim=0,
                            packed_dim=1, packed_factor=8, weight_loader=lambda *a: None)
    q = W.clone_vllm_param(p)
    assert type(q) is PackedvLLMParameter
    assert (q.input_dim, q.output_dim, q.packed_dim, q.packed_factor) == (1, 0, 1, 8)
    assert torch.equal(q.data, p.data) and q.data.data_ptr() != p.data.data_ptr()
    s = GroupQuantScaleParameter(data=torch.ones(3, 2), output_dim=0, input_dim=1, weight_loader=lambda *a: None)
    t = W.clone_vllm_param(s)
    assert type(t) is GroupQuantScaleParameter and (t.input_dim, t.output_dim) == (1, 0)


class _Kernel:
    """Stands in for an MP kernel: repacks the weight in place at load (like Machete/Marlin) and records use."""

    def __init__(self, name, scale):
        self.name, self.scale, self.calls = name, scale, []

    def process_weights_after_loading(self, layer):
        layer.weight_packed.data = layer.weight_packed.data * self.scale  # "repack" (layout of this kernel)
        if self.name == "small" and getattr(layer, "bias", None) is not None:
            layer.bias.data = layer.bias.data.flip(0)  # Marlin permutes the bias into its layout

    def apply_weights(self, layer, x, bias=None):
        self.calls.append(x.shape[0])
        w = layer.weight_packed.data / self.scale  # un-"repack": both must see the original weights
        y = x @ w.t()
        if bias is not None:
            y = y + (bias.flip(0) if self.name == "small" else bias)
        return y


@pytest.mark.parametrize("with_bias", [False, True])
def test_dual_dispatch_rule_and_independent_copies(with_bias):
    layer = torch.nn.Module()
    w = torch.randn(6, 5)
    layer.weight_packed = torch.nn.Parameter(w.clone(), requires_grad=False)
    layer.output_size_per_partition = 6
    bias = torch.randn(6) if with_bias else None
    if with_bias:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    large, small = _Kernel("large", 3.0), _Kernel("small", 7.0)
    # the plugin's order: the small kernel's copy is taken, then the large kernel repacks the layer in place
    d = W.DualW4(layer, large, small, ["weight_packed", "weight_scale"], max_m=4, key="test.layer")
    large.process_weights_after_loading(layer)
    assert W.lookup("test.layer") is d
    assert not any("shadow" in n for n, _ in layer.named_parameters())  # the copy is not a registered submodule
    for m in (1, 4, 5, 64):
        x = torch.randn(m, 5)
        y = d.apply(x, layer.bias if with_bias else None)
        ref = x @ w.t() + (bias if with_bias else 0)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert small.calls == [1, 4] and large.calls == [5, 64]
    # 3-D input (batch, tokens, features): dispatch counts tokens
    y3 = d.apply(torch.randn(2, 3, 5), None)
    assert y3.shape == (2, 3, 6) and large.calls[-1] == 6


def test_lookup_unknown_key():
    with pytest.raises(RuntimeError, match="no layer registered"):
        W.lookup("no.such.layer")
