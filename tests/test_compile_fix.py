"""vllm_plugin/compile_fix: the split fix-ups graph dispatch needs (the whole path runs through vLLM's backend in
tests/test_kernels_linear.py::test_w8a8_graph_dispatch_through_vllms_compile_backend)."""

import torch
import torch.fx as fx

from vllm_superweight.vllm_plugin import compile_fix


def _piece_with_get_attr_between_placeholders() -> fx.GraphModule:
    """A piece as split_module writes one around a torch.cond: placeholder, get_attr, then more placeholders."""
    root = torch.nn.Module()
    root.sub = torch.nn.Linear(2, 2)
    g = fx.Graph()
    a = g.placeholder("a")
    w = g.get_attr("sub.weight")
    b = g.placeholder("b")
    c = g.placeholder("c")
    out = g.call_function(torch.add, (a, g.call_function(torch.mul, (b, c))))
    g.output(g.call_function(torch.add, (out, g.call_method("sum", (w,)))))
    return fx.GraphModule(root, g)


def test_placeholders_first_keeps_signature_and_result():
    gm = _piece_with_get_attr_between_placeholders()
    a, b, c = (torch.randn(2, 2) for _ in range(3))
    want = gm(a, b, c)
    assert [n.op for n in gm.graph.nodes][:4] == ["placeholder", "get_attr", "placeholder", "placeholder"]
    top_graph = fx.Graph()
    top_graph.output(None)
    top = fx.GraphModule(torch.nn.Module(), top_graph)  # vLLM's split module: the pieces are its children
    top.add_submodule("submod_0", gm)
    assert compile_fix.placeholders_first(top) == 2
    ops = [n.op for n in gm.graph.nodes]
    assert ops[:4] == ["placeholder", "placeholder", "placeholder", "get_attr"]
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["a", "b", "c"]
    torch.testing.assert_close(gm(a, b, c), want)
    assert compile_fix.placeholders_first(top) == 0  # already in order: untouched


def test_install_wraps_vllms_split_once(monkeypatch):
    import vllm.compilation.backends as VB

    orig = VB.split_graph
    monkeypatch.setattr(VB, "split_graph", orig)
    assert compile_fix.install() and VB.split_graph is not orig
    wrapped = VB.split_graph
    assert compile_fix.install() and VB.split_graph is wrapped  # idempotent


def test_warns_once_unless_the_compile_cache_is_off(monkeypatch, caplog):
    monkeypatch.setattr(compile_fix, "_warned", False)
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    assert not compile_fix.warn_if_compile_cache() and not caplog.records
    monkeypatch.delenv("VLLM_DISABLE_COMPILE_CACHE")
    with caplog.at_level("WARNING", logger="vllm.superweight_rtn"):
        assert compile_fix.warn_if_compile_cache() and compile_fix.warn_if_compile_cache()
    assert sum("VLLM_DISABLE_COMPILE_CACHE=1" in r.getMessage() for r in caplog.records) == 1
