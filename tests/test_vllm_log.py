"""benchmarks/vllm_log.py: what the throughput records take from an engine's log."""

from bench_module import load


def test_engine_log_records_the_kernel_lines():
    """benchmarks/vllm_log.py keeps our plugin's kernel-choice lines, the panel kernel's and the cubin reader's
    included, and vLLM's sizes."""
    vl = load("vllm_log")
    text = (
        "INFO ... superweight_rtn W4 linears: Marlin+SELL (first: model.layers.0.self_attn.qkv_proj)\n"
        "INFO ... superweight_rtn held-out correction: shared-memory CUDA kernel up to 96 tokens (PanelConfig()), "
        "Triton above\n"
        "INFO ... superweight_rtn: Humming's cubin symbol lookups read with struct (pyelftools cost ...)\n"
        "INFO ... GPU KV cache size: 245,824 tokens\n"
        "INFO ... unrelated line\n"
    )
    out = vl.parse_text(text)
    assert out["kv_cache_tokens"] == 245824
    assert len(out["superweight_kernels"]) == 3
    assert "Humming's cubin symbol lookups read with struct (pyelftools cost ...)" in out["superweight_kernels"]
    assert any(k.startswith("held-out correction: shared-memory") for k in out["superweight_kernels"])
