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


def test_install_wraps_vllm_once(monkeypatch):
    import vllm.compilation.backends as VB

    # vLLM's own functions (another test's kernel may have wrapped them in this process)
    orig = getattr(VB.split_graph, "__wrapped__", VB.split_graph)
    orig_compile = getattr(VB.CompilerManager.compile, "__wrapped__", VB.CompilerManager.compile)
    monkeypatch.setattr(VB, "split_graph", orig)
    monkeypatch.setattr(VB.CompilerManager, "compile", orig_compile)
    assert compile_fix.install() and VB.split_graph is not orig and VB.CompilerManager.compile is not orig_compile
    wrapped = VB.split_graph, VB.CompilerManager.compile
    assert compile_fix.install() and (VB.split_graph, VB.CompilerManager.compile) == wrapped  # idempotent


def test_resolve_conds_inlines_the_branch_the_range_decides():
    """A cond on ``M <= 4`` traced by Dynamo: resolved for ranges from 1 and from 5, the copies hold no cond, keep the
    signature and compute the branch each range needs (the original keeps its cond)."""
    graphs: list[fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(x):
        return torch.cond(x.shape[0] <= 4, lambda t: t + 1.0, lambda t: t * 2.0, (x,))

    x = torch.randn(6, 3)
    torch._dynamo.mark_dynamic(x, 0)
    torch.compile(f, backend=backend, fullgraph=True)(x)
    (gm,) = graphs
    ph_nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    phs = [n.name for n in ph_nodes]
    low, high = compile_fix.resolve_conds(gm, 1), compile_fix.resolve_conds(gm, 5)
    assert low is not None and high is not None
    for g in (low, high):
        assert not any(n.target is torch.ops.higher_order.cond for n in g.graph.nodes)
        assert [n.name for n in g.graph.nodes if n.op == "placeholder"] == phs
    assert any(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes)
    args = [6 if isinstance(n.meta.get("example_value"), torch.SymInt) else x for n in ph_nodes]  # M, x
    torch.testing.assert_close(high(*args)[0], x * 2.0)
    torch.testing.assert_close(low(*args)[0], x + 1.0)  # the true branch: right wherever the range starts at or below
    assert compile_fix.resolve_conds(high, 5) is None  # nothing left to resolve
