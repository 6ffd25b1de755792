"""The random-weight model shapes of the GPU benchmarks (``make_random_llama.py --shape``), in one place and
without torch, so the plots can name what a record measured."""

SHAPES = {
    "llama2-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32),
    # the same layers, 8 of them: engines start in a third of the time (host-overhead A/B within one short lease)
    "llama2-7b-8l": dict(hidden=4096, inter=11008, layers=8, heads=32, kv_heads=32),
    "tiny": dict(hidden=512, inter=1408, layers=4, heads=8, kv_heads=8),
}
DEFAULT_SHAPE = "llama2-7b"  # what records before session 49 (no "shape" field) measured
