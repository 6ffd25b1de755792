"""Diagnosis (session 49): where vLLM's compile of a W8A8 checkpoint with SUPERWEIGHT_W8A8_GRAPH_DISPATCH=1 fails.
Dumps the Dynamo graph before / after vLLM's piecewise split and, for a piece whose Inductor compile raises, the
piece's graph and the example inputs it was given. In-process engine (the patches must reach the compile).

    python benchmarks/diag/gdispatch_graph.py CKPT OUTDIR
"""

import os
import sys
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ["SUPERWEIGHT_W8A8_GRAPH_SPLIT"] = "1"
os.environ["SUPERWEIGHT_W8A8_GRAPH_DISPATCH"] = os.environ.get("SUPERWEIGHT_W8A8_GRAPH_DISPATCH", "1")
ckpt, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)

import vllm.compilation.backends as B  # noqa: E402
import vllm.compilation.compiler_interface as CI  # noqa: E402

_split = B.split_graph


def split_graph(graph, ops):
    with open(os.path.join(out, "before_split.py"), "w") as f:
        f.write(graph.print_readable(print_output=False))
    gm, items = _split(graph, ops)
    with open(os.path.join(out, "after_split.py"), "w") as f:
        f.write(gm.print_readable(print_output=False))
    return gm, items


B.split_graph = split_graph
_compile = CI.InductorStandaloneAdaptor.compile
_n = [0]


def compile(self, graph, example_inputs, *a, **kw):
    _n[0] += 1
    try:
        return _compile(self, graph, example_inputs, *a, **kw)
    except Exception:
        with open(os.path.join(out, f"failed_piece_{_n[0]}.py"), "w") as f:
            f.write(graph.print_readable(print_output=False))
            f.write("\n# example inputs:\n")
            for i, x in enumerate(example_inputs):
                f.write(f"# {i}: {type(x).__name__} {getattr(x, 'shape', x)}\n")
            ph = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
            f.write(f"# placeholders ({len(ph)}): {ph}\n# example inputs: {len(example_inputs)}\n")
            f.write("# " + traceback.format_exc().replace("\n", "\n# "))
        raise


CI.InductorStandaloneAdaptor.compile = compile

from vllm import LLM, SamplingParams  # noqa: E402

try:
    llm = LLM(
        model=ckpt,
        max_model_len=512,
        gpu_memory_utilization=0.6,
        enable_prefix_caching=False,
        compilation_config={"cudagraph_capture_sizes": [1, 8, 64]},
    )
    r = llm.generate(["The capital of France is"] * 8, SamplingParams(max_tokens=8, temperature=0))
    print("OK", r[0].outputs[0].text)
except Exception as e:
    print("FAILED", type(e).__name__, str(e)[:500])
    traceback.print_exc()
