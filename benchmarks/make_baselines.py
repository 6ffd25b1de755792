"""AWQ W4A16 and SmoothQuant W8A8 baseline checkpoints made with llm-compressor (compressed-tensors format).

Runs in its OWN environment (llm-compressor pins compressed-tensors / transformers versions that clash with the
serving venv; see benchmarks/requirements-llmcompressor.txt):

    python3.11 -m venv .venv-llmc && .venv-llmc/bin/pip install -r benchmarks/requirements-llmcompressor.txt
    .venv-llmc/bin/python benchmarks/make_baselines.py awq FLOAT_DIR OUT_DIR --group 64
    .venv-llmc/bin/python benchmarks/make_baselines.py smoothquant FLOAT_DIR OUT_DIR

FLOAT_DIR is the HF directory of the dequantized float model (``benchmarks/float_checkpoint.py``).
The output is a compressed-tensors checkpoint that vLLM serves directly (``quant_method: compressed-tensors``).

* ``awq``: AWQ scaling search (llm-compressor ``AWQModifier``, default Llama/Gemma mappings, duo_scaling "both")
  then asymmetric int4 min-max weight quantization in groups of ``--group`` input elements
  (``QuantizationModifier``; ``pack-quantized`` format). lm_head / embeddings stay float.
* ``smoothquant``: ``SmoothQuantModifier(smoothing_strength=0.8)`` then ``GPTQModifier`` with int8 symmetric
  per-channel weights and dynamic symmetric per-token int8 activations (the ``W8A8`` preset;
  ``int-quantized`` format), as llm-compressor's W8A8-int8 example does.

Calibration text (NOT WikiText-2): the English prose of Python's own documentation shipped in the standard
library, ``pydoc_data.topics.topics`` (79 topics, ~465k characters), joined in sorted-key order, tokenized with the
model's tokenizer and cut into ``--samples`` consecutive chunks of ``--seqlen`` tokens (default 128 x 512).
``baseline_info.json`` in OUT_DIR records the method, calibration and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vllm_superweight.eval import default_bos  # noqa: E402  (stdlib-only module: fine in the llm-compressor venv)

CALIB_NAME = "python-stdlib pydoc_data.topics (Python documentation prose)"


def calibration_dataset(tokenizer, samples: int, seqlen: int, bos: int | None):
    """A datasets.Dataset of ``samples`` chunks of ``seqlen`` tokens of the pydoc topics text."""
    from pydoc_data.topics import topics

    from datasets import Dataset

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    body = seqlen - (1 if bos is not None else 0)
    n = len(ids) // body
    if n < samples:
        print(
            f"[baselines] only {n} chunks of {seqlen} tokens in the calibration text (asked {samples})", file=sys.stderr
        )
        samples = n
    rows = []
    for i in range(samples):
        chunk = ids[i * body : (i + 1) * body]
        if bos is not None:
            chunk = [bos] + chunk
        rows.append({"input_ids": chunk, "attention_mask": [1] * len(chunk)})
    return Dataset.from_list(rows), samples, len(ids)


def _cpu_workarounds() -> None:
    """llm-compressor 0.13.0 pins cached activations (``Tensor.pin_memory``) before AWQ's grid search, which raises
    "Cannot access accelerator device when none is available" on a CPU-only machine. Pinning only speeds up
    host-to-device copies, so without an accelerator it is skipped (no effect on the numbers)."""
    import torch

    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines import cache

    cache.IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def smoothquant_mappings(model_type: str):
    """SmoothQuant (balance layers, smoothed norm) pairs where llm-compressor's defaults are wrong, else None.

    llm-compressor 0.13 maps Gemma-2/3 to its Llama defaults, which smooth gate/up_proj into
    ``post_attention_layernorm``. In Gemma-2/3 that norm is applied to the attention OUTPUT (sandwich norms);
    the MLP's input norm is ``pre_feedforward_layernorm``. Smoothing the wrong norm rescales the residual stream
    and leaves the MLP input unscaled: the model breaks (measured: WikiText-2 ppl 1.1e11 on Gemma-3-270M)."""
    if model_type.startswith(("gemma2", "gemma3")):
        return [
            [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
            [["re:.*gate_proj", "re:.*up_proj"], "re:.*pre_feedforward_layernorm"],
        ]
    return None


def build_recipe(method: str, group: int, smoothing: float, n_grid: int = 20, model_type: str = ""):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group),
        )
        return [
            AWQModifier(duo_scaling="both", n_grid=n_grid),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
        ]
    if method == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        maps = smoothquant_mappings(model_type)
        return [
            SmoothQuantModifier(smoothing_strength=smoothing, **({"mappings": maps} if maps else {})),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ]
    raise SystemExit(f"unknown method {method!r} (awq | smoothquant)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=["awq", "smoothquant"])
    p.add_argument("float_dir", help="HF directory of the float model")
    p.add_argument("out_dir")
    p.add_argument("--group", type=int, default=128, help="AWQ group size (must divide every input dim; default 128)")
    p.add_argument("--smoothing", type=float, default=0.8, help="SmoothQuant smoothing strength (default 0.8)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument(
        "--batch-size", type=int, default=16, help="calibration batch size (all samples have --seqlen tokens)"
    )
    p.add_argument("--n-grid", type=int, default=20, help="AWQ grid points per mapping (llm-compressor default 20)")
    p.add_argument("--dtype", default="bfloat16", help="dtype the model is calibrated and saved in (default bfloat16)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import llmcompressor
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    _cpu_workarounds()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.float_dir)
    model = AutoModelForCausalLM.from_pretrained(args.float_dir, dtype=getattr(torch, args.dtype))
    model.eval()
    bos = default_bos(tok)
    ds, n_samples, calib_tokens = calibration_dataset(tok, args.samples, args.seqlen, bos)
    model_type = getattr(model.config, "model_type", "") or ""
    recipe = build_recipe(args.method, args.group, args.smoothing, args.n_grid, model_type)

    tmp = args.out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=args.seqlen,
        num_calibration_samples=n_samples,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(tmp, save_compressed=True)
    tok.save_pretrained(tmp)
    info = {
        "method": args.method,
        "calib": f"{CALIB_NAME}: {n_samples} x {args.seqlen} tokens",
        "calib_source": "pydoc_data.topics",
        "samples": n_samples,
        "seqlen": args.seqlen,
        "group": args.group if args.method == "awq" else None,
        "n_grid": args.n_grid if args.method == "awq" else None,
        "batch_size": args.batch_size,
        "smoothing_strength": args.smoothing if args.method == "smoothquant" else None,
        "recipe": [type(m).__name__ for m in recipe],
        "smoothquant_mappings": smoothquant_mappings(model_type) if args.method == "smoothquant" else None,
        "scheme": (
            f"W4A16 asymmetric int4, group {args.group}, pack-quantized"
            if args.method == "awq"
            else "W8A8 int8 symmetric per-channel weights (GPTQ), dynamic symmetric per-token int8 activations"
        ),
        "dtype": args.dtype,
        "llmcompressor": llmcompressor.__version__ if hasattr(llmcompressor, "__version__") else "?",
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
        "float_dir": os.path.abspath(args.float_dir),
    }
    try:
        import compressed_tensors

        info["compressed_tensors"] = compressed_tensors.__version__
    except Exception:
        pass
    with open(os.path.join(tmp, "baseline_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(args.out_dir, ignore_errors=True)
    os.replace(tmp, args.out_dir)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
