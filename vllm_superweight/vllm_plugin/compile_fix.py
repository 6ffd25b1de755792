"""What vLLM 0.26's piecewise compile needs to take a ``torch.cond`` (``SUPERWEIGHT_W8A8_GRAPH_DISPATCH``).

The W8A8 layer's choice between our Triton GEMM (the opaque op, which routes by token count itself) and vLLM's
CUTLASS call traced into the graph is a ``torch.cond`` on ``M <= bound``. Three things in vLLM's path do not take
one, all found on the H100 in session 49:

1. vLLM splits the Dynamo graph (``torch.fx.passes.split_module``) and takes each piece's example inputs from its
   leading placeholders (``get_fake_args_from_graph`` / ``create_concrete_args`` stop at the first other node); a
   piece's inputs come in first-use order, and the cond's branch subgraphs (``get_attr``) precede the weight and
   scales it reads, so Inductor got too few inputs ("Expected positional argument for parameter ..._weight_").
2. Dynamo computes the token-count test once and every layer's cond reads it: the split passed a SymBool from
   piece to piece, which Inductor refuses as an input ("Unsupported inductor graph input type: LessThan").
3. torch 2.11's FX-graph and AOT-autograd caches refuse a graph holding a cond, and vLLM stops when it cannot save
   its artifact.

``install()`` wraps vLLM at three points: ``split_graph`` (before the split each SymBool node gets a copy beside each
user; after it each piece's placeholders come first again -- placeholders read nothing, so the signature and the
computation are unchanged) and ``CompilerManager.compile`` (each piece is compiled per token range: a cond whose
range lies wholly above its bound is replaced by its CUTLASS branch, any other by its opaque-op branch, which is right
at every M -- so no cond reaches Inductor and the caches work). ``add_range_endpoint(bound)`` makes a range start just
above the bound: there (the prefill chunks no CUDA graph covers) the graph calls vLLM's CUTLASS op directly. Installed
by the W8A8 kernel only where the graph dispatch is on; other graphs hold no cond and pass unchanged.
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any

import torch
import torch.fx as fx

_MARK = "_superweight_split_fix"
_endpoints_added: list[int] = []  # the endpoint add_range_endpoint put in the config


def sym_bools_per_user(gm: fx.GraphModule) -> int:
    """Give every user of a SymBool-valued node its own copy of it, placed just before that user, and drop the
    shared node. Returns how many copies were made."""
    made = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.meta.get("example_value"), torch.SymBool):
            continue
        users = list(node.users)
        if len(users) < 2:
            continue
        for user in users:
            with gm.graph.inserting_before(user):
                copy = gm.graph.node_copy(node)
            user.replace_input_with(node, copy)
            made += 1
        gm.graph.erase_node(node)
    if made:
        gm.graph.lint()
        gm.recompile()
    return made


def placeholders_first(gm: fx.GraphModule) -> int:
    """Move the placeholders of ``gm`` and of its direct submodules (vLLM's pieces) ahead of every other node, in
    their own order; recompile what changed. Returns how many placeholders moved."""
    moved = 0
    for mod in (gm, *gm.children()):
        if not isinstance(mod, fx.GraphModule):
            continue
        anchor: fx.Node | None = None
        n_mod = 0
        for node in list(mod.graph.nodes):
            if node.op != "placeholder":
                anchor = anchor or node
            elif anchor is not None:
                anchor.prepend(node)
                n_mod += 1
        if n_mod:
            mod.graph.lint()
            mod.recompile()
            moved += n_mod
    return moved


def _le_bound(pred: Any) -> int | None:
    """``b`` where the cond's predicate node is ``M <= b`` (an int), else None."""
    if isinstance(pred, fx.Node) and pred.op == "call_function" and pred.target is operator.le:
        b = pred.args[1]
        if isinstance(b, int):
            return b
    return None


def resolve_conds(gm: fx.GraphModule, start: int) -> fx.GraphModule | None:
    """A copy of the piece ``gm`` for token counts from ``start`` up, with each ``M <= b`` cond replaced by the nodes
    of one branch: the false one (CUTLASS) where ``start > b``, the true one (the opaque op) otherwise. Placeholders
    (the signature) kept; None where ``gm`` holds no cond or a branch reads attributes of its own."""
    conds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond]
    if not conds:
        return None
    graph = fx.Graph()
    val_map: dict[fx.Node, Any] = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    out = fx.GraphModule(gm, graph)
    for node in [val_map[c] for c in conds]:
        pred, t_attr, f_attr, operands = node.args[:4]
        b = _le_bound(pred)
        branch = getattr(out, (f_attr if b is not None and start > b else t_attr).target)
        if any(n.op == "get_attr" for n in branch.graph.nodes):
            return None
        phs = [n for n in branch.graph.nodes if n.op == "placeholder"]
        inner: dict[fx.Node, Any] = dict(zip(phs, operands))
        with graph.inserting_before(node):
            res = graph.graph_copy(branch.graph, inner)
        for user in list(node.users):
            if user.target is not operator.getitem:
                return None
            user.replace_all_uses_with(res[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        for dead in (pred, t_attr, f_attr):
            if isinstance(dead, fx.Node) and not dead.users:
                graph.erase_node(dead)
    graph.lint()
    out.recompile()
    return out


def add_range_endpoint(bound: int) -> bool:
    """Make vLLM compile a range starting at ``bound + 1`` (``compile_ranges_endpoints`` of the current config, read
    when the pieces are compiled; set during the model's load, so the same in every start and in the cache key).
    One endpoint in all: the largest bound asked for. False where no config is current or it does not compile
    piecewise."""
    try:
        from vllm.config import CompilationMode, get_current_vllm_config_or_none
    except ImportError:
        return False
    vc = get_current_vllm_config_or_none()  # set while vLLM loads a model; not around a bare layer
    if vc is None:
        return False
    cc = vc.compilation_config
    if cc.mode != CompilationMode.VLLM_COMPILE or cc.compile_ranges_endpoints is None:
        return False
    eps = [e for e in cc.compile_ranges_endpoints if e not in _endpoints_added]
    top = max([bound, *_endpoints_added])
    if top + 1 >= max(eps, default=0):
        return False  # no range above: nothing to split
    _endpoints_added[:] = [top]
    cc.compile_ranges_endpoints = sorted({*eps, top})
    logging.getLogger("vllm.superweight_rtn").info(
        "W8A8 graph dispatch: compile ranges end at %s (above %d tokens the graph calls CUTLASS itself)",
        cc.compile_ranges_endpoints,
        top,
    )
    return True


def install() -> bool:
    """Wrap ``vllm.compilation.backends.split_graph`` (once per process). False where this vLLM has no such
    function (another version: nothing to fix, or a different layout)."""
    try:
        from vllm.compilation import backends
    except ImportError:
        return False
    orig = getattr(backends, "split_graph", None)
    if orig is None:
        return False
    if getattr(orig, _MARK, False):
        return True

    @functools.wraps(orig)
    def split_graph(graph: fx.GraphModule, *args: Any, **kwargs: Any):
        sym_bools_per_user(graph)
        split_gm, items = orig(graph, *args, **kwargs)
        placeholders_first(split_gm)
        return split_gm, items

    setattr(split_graph, _MARK, True)
    backends.split_graph = split_graph

    manager = backends.CompilerManager
    orig_compile = manager.compile

    @functools.wraps(orig_compile)
    def compile(self, graph: fx.GraphModule, example_inputs: Any, *args: Any, **kwargs: Any):
        compile_range = kwargs.get("compile_range", args[2] if len(args) > 2 else None)
        start = getattr(compile_range, "start", 1)
        resolved = resolve_conds(graph, start) if isinstance(graph, fx.GraphModule) else None
        return orig_compile(self, resolved if resolved is not None else graph, example_inputs, *args, **kwargs)

    manager.compile = compile
    return True
