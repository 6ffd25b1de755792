"""benchmarks/norm_xt_bench.py: the norm it compiles is vLLM's residual add + RMSNorm, its transposed output is x^T, and
the kernel count it reports is read from Inductor's code."""

import torch
from bench_module import load


def test_fused_add_rmsnorm_matches_a_float64_reference_and_returns_the_sum_as_residual():
    nx = load("norm_xt_bench")
    g = torch.Generator().manual_seed(0)
    x, res = (torch.randn(5, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(torch.bfloat16)
    out, new_res = nx.fused_add_rmsnorm(x, res, w, eps=1e-5)
    h = x.double() + res.double()
    ref = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert out.dtype == torch.bfloat16 and torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(new_res, (x.float() + res.float()).to(torch.bfloat16))


def test_transposed_output_is_a_contiguous_copy_of_the_norm():
    nx = load("norm_xt_bench")
    x, res = torch.randn(3, 16).to(torch.bfloat16), torch.randn(3, 16).to(torch.bfloat16)
    out, _, out_t = nx.norm_and_transposed(x, res, torch.ones(16, dtype=torch.bfloat16))
    assert out_t.shape == (16, 3) and out_t.is_contiguous() and torch.equal(out_t, out.t())


def test_kernel_count_reads_triton_definitions():
    nx = load("norm_xt_bench")
    code = "@triton_heuristics.reduction(...)\n@triton.jit\ndef k0(): ...\n\n@triton.jit\ndef k1(): ...\ncall(k0)\n"
    assert nx.kernel_count(code) == 2 and nx.kernel_count("def f(): pass") == 0
