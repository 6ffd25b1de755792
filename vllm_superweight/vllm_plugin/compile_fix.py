"""A fix for vLLM 0.26's piecewise compile when a graph holds a ``torch.cond`` (``SUPERWEIGHT_W8A8_GRAPH_DISPATCH``).

vLLM splits the Dynamo graph at its splitting ops (``torch.fx.passes.split_module``) and compiles every piece up front
for its token ranges, taking the piece's example inputs from its leading placeholder nodes
(``piecewise_backend.get_fake_args_from_graph`` and ``create_concrete_args`` stop at the first other node). A
``torch.cond``'s branches are subgraph modules read by ``get_attr`` nodes, and ``split_module`` writes a piece's
inputs in the order the piece first uses them: every input the cond brings after its branches (the layer's weight
and scales) becomes a placeholder *after* two ``get_attr`` nodes, vLLM hands Inductor too few example inputs, and the
engine stops at start-up ("Expected positional argument for parameter ..._weight_", session 49 on the H100).

Second, Dynamo computes the token-count test (``s72 <= 32``) once and every layer's cond reads that one node, so the
split passes it from piece to piece as a SymBool, which Inductor refuses as a graph input ("Unsupported inductor
graph input type: LessThan", session 49).

``install()`` wraps vLLM's ``split_graph``: before the split, each SymBool node gets a copy beside each of its users
(its inputs are SymInts, which pieces take fine); after it, each piece's placeholders come first again
(placeholders read nothing, so moving them ahead of the ``get_attr`` nodes, in their own order, i.e. the piece's
signature, changes no computation). Installed by the W8A8 kernel only where the graph dispatch is on; graphs
without a ``torch.cond`` have no such nodes and are left as they are.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.fx as fx

_MARK = "_superweight_split_fix"
_warned = False


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


def warn_if_compile_cache() -> bool:
    """torch 2.11's FX-graph and AOT-autograd caches refuse a graph holding a ``torch.cond`` ("Can't cache
    HigherOrderOperator: cond"), and vLLM stops a compiled engine at start-up when it cannot save its artifact: say
    so (once a process) before the compile unless ``VLLM_DISABLE_COMPILE_CACHE=1``. True where the cache is on."""
    global _warned
    cache_on = os.environ.get("VLLM_DISABLE_COMPILE_CACHE", "0") != "1"
    if cache_on and not _warned:
        _warned = True
        logging.getLogger("vllm.superweight_rtn").warning(
            "SUPERWEIGHT_W8A8_GRAPH_DISPATCH=1 puts a torch.cond in the compiled graph, which torch 2.11's compile "
            "caches refuse: a compiled engine stops at start-up unless VLLM_DISABLE_COMPILE_CACHE=1 (or eager)"
        )
    return cache_on


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
    return True
