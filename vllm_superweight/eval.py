"""WikiText-2 perplexity through vLLM (``superweight eval CKPT``), plus an independent transformers computation.

Protocol (fixed; every number of the quality table uses it, the float reference included):

* Text: the WikiText-2 raw test file (``wiki.test.raw``), CRLF normalised to LF, its lines (each keeping its
  ``\\n``) joined with ``"\\n\\n"`` -- what GPTQ / AWQ do with ``"\\n\\n".join(dataset["text"])``. (The shared
  copy of the file has no blank lines, so this equals joining the dataset's non-empty rows.)
* Tokenized ONCE with the checkpoint's own tokenizer, without special tokens.
* Cut into non-overlapping windows of ``window`` tokens (stride = window); a partial last window is dropped;
  ``max_tokens`` keeps only the first ``max_tokens`` tokens (rounded down to whole windows).
* Each window is one prompt. If the tokenizer adds a BOS token by default (Gemma), BOS is prepended to every
  window as context. The first text token of each window is context only; every other token is scored given
  its whole prefix within the window: ``window - 1`` scored tokens per window.
* vLLM returns, through ``prompt_logprobs=0``, the log-probability of the ACTUAL prompt token at every
  position (vLLM 0.26 ``Sampler.gather_logprobs`` puts the target token's logprob first, followed by the top-k,
  here k = 0; the logprobs are ``log_softmax`` of the raw logits in float32, before any sampling processor).
* perplexity = exp(mean NLL over all scored tokens).

``perplexity_transformers`` computes the same number with a plain transformers forward pass (spot checks).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

from . import envs
from .models import file_sha256

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_ENV = envs.WIKITEXT


def default_text_path() -> str:
    """$SUPERWEIGHT_WIKITEXT, else ../shared/data/wikitext-2-raw/wiki.test.raw beside the repository."""
    env = envs.wikitext_path()
    if env:
        return env
    for base in (os.path.join(REPO_ROOT, "..", "shared"), os.path.join(REPO_ROOT, "shared")):
        p = os.path.normpath(os.path.join(base, "data", "wikitext-2-raw", "wiki.test.raw"))
        if os.path.exists(p):
            return p
    return os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw"))


DEFAULT_WINDOW = 512
ENGINE_STARTED = False  # set once a vLLM engine was started in this process (see exit_now)

PROTOCOL = (
    "WikiText-2 raw test: lines joined with '\\n\\n' (GPTQ/AWQ), tokenized once without special tokens, "
    "non-overlapping windows of {window} tokens (stride {window}, partial tail dropped), BOS prepended to each "
    "window only if the tokenizer adds one by default, first token of each window context only, "
    "ppl = exp(mean NLL) over the other {scored} tokens per window"
)


# ----------------------------------------------------------------------------------------------------------
# text and windows (pure python; unit-tested)
# ----------------------------------------------------------------------------------------------------------
def load_text(path: str) -> str:
    """The evaluation text: the file's lines (LF, each keeping its newline) joined with "\\n\\n"."""
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8")
    raw = raw.replace("\r\n", "\n")
    return "\n\n".join(raw.splitlines(keepends=True))


def make_windows(ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of ``window`` tokens (stride = window) over the first ``max_tokens`` ids."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens (got {window})")
    n = len(ids) if max_tokens is None else min(len(ids), int(max_tokens))
    nw = n // window
    if nw == 0:
        raise ValueError(f"{n} tokens do not fill one window of {window} tokens")
    return [list(ids[i * window : (i + 1) * window]) for i in range(nw)]


def default_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one by default (Gemma, Llama-2), else None (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def build_prompts(windows: list[list[int]], bos: int | None) -> tuple[list[list[int]], int]:
    """Prompts (token ids) and the number of leading context positions that are not scored."""
    if bos is None:
        return [list(w) for w in windows], 1
    return [[bos] + list(w) for w in windows], 2


def nll_sum_from_prompt_logprobs(prompt: list[int], prompt_logprobs, n_context: int) -> tuple[float, int]:
    """Sum of -logprob(actual token) over positions n_context.. of one prompt, and the count.

    ``prompt_logprobs`` is vLLM's per-position list (entry 0 is None, entries are dicts token_id -> Logprob,
    or a FlatLogprobs container that indexes the same way).
    """
    if prompt_logprobs is None or len(prompt_logprobs) != len(prompt):
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise RuntimeError(f"vLLM returned {got} prompt logprobs for a prompt of {len(prompt)} tokens")
    total = 0.0
    for pos in range(n_context, len(prompt)):
        entry = prompt_logprobs[pos]
        tok = prompt[pos]
        if entry is None or tok not in entry:
            raise RuntimeError(f"prompt logprobs at position {pos} lack the actual token {tok}")
        lp = entry[tok].logprob
        if not math.isfinite(lp):
            # -inf: the model assigned probability 0 (e.g. NaN logits) -> infinite perplexity, stated as such
            return float("inf"), len(prompt) - n_context
        total -= lp
    return total, len(prompt) - n_context


def tokenize_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _prepare(tokenizer, text_path: str, window: int, max_tokens: int | None):
    text = load_text(text_path)
    ids = tokenize_text(tokenizer, text)
    windows = make_windows(ids, window, max_tokens)
    bos = default_bos(tokenizer)
    prompts, n_ctx = build_prompts(windows, bos)
    return ids, windows, bos, prompts, n_ctx


BOOTSTRAP_REPS = 1000


def window_spread(per_window: list[tuple[float, int]], reps: int = BOOTSTRAP_REPS, seed: int = 0) -> dict:
    """How much the perplexity depends on which windows were scored: the standard error of the mean NLL over
    windows and a 95% bootstrap interval of the perplexity (windows resampled with replacement, seeded). Two
    checkpoints scored on the same windows are compared better by ``paired_bootstrap`` on their ``window_nll``."""
    import numpy as np

    s = np.array([w[0] for w in per_window], dtype=np.float64)
    c = np.array([w[1] for w in per_window], dtype=np.float64)
    if len(s) < 2:
        return {}
    per = s / c
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(s), size=(reps, len(s)))
    boot = s[idx].sum(1) / c[idx].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "nll_stderr_windows": float(per.std(ddof=1) / math.sqrt(len(per))),
        "ppl_ci95_bootstrap": [float(math.exp(min(lo, 700))), float(math.exp(min(hi, 700)))],
        "bootstrap_reps": reps,
    }


def paired_bootstrap(a: list[list[float]], b: list[list[float]], reps: int = BOOTSTRAP_REPS, seed: int = 0) -> dict:
    """Relative perplexity difference ppl(b) / ppl(a) - 1 of two evaluations of the SAME windows (their
    ``window_nll`` lists of [nll_sum, tokens]) with a 95% paired bootstrap interval: a difference whose interval
    excludes 0 is not window noise."""
    import numpy as np

    sa, ca = np.array([w[0] for w in a]), np.array([w[1] for w in a], dtype=np.float64)
    sb, cb = np.array([w[0] for w in b]), np.array([w[1] for w in b], dtype=np.float64)
    if len(sa) != len(sb) or not np.array_equal(ca, cb):
        raise ValueError("paired_bootstrap needs the same windows on both sides")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sa), size=(reps, len(sa)))
    d = np.exp((sb[idx].sum(1) - sa[idx].sum(1)) / ca[idx].sum(1)) - 1
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"rel_diff": float(math.exp((sb.sum() - sa.sum()) / ca.sum()) - 1), "ci95": [float(lo), float(hi)]}


def _result(
    nll: float,
    count: int,
    *,
    ids,
    windows,
    bos,
    window,
    text_path,
    extra: dict,
    per_window: list[tuple[float, int]] | None = None,
) -> dict:
    mean = nll / count
    ppl = math.exp(mean) if mean < 700 else float("inf")
    out = {
        "ppl": ppl,
        "nll_mean": mean,
        "tokens": count,  # scored tokens
        "text_tokens": len(ids),  # tokens of the whole joined text
        "windows": len(windows),
        "window": window,
        "stride": window,
        "bos_prepended": bos is not None,
        "text": os.path.abspath(text_path),
        "text_sha256": file_sha256(text_path),
        "protocol": PROTOCOL.format(window=window, scored=window - 1),
    }
    if per_window:
        out.update(window_spread(per_window))
        out["window_nll"] = [[round(s, 6), c] for s, c in per_window]
    out.update(extra)
    return out


def _setdefault_env() -> None:
    envs.setdefault_vllm_env()


# ----------------------------------------------------------------------------------------------------------
# vLLM
# ----------------------------------------------------------------------------------------------------------
def perplexity(
    model_dir: str,
    *,
    text_path: str | None = None,
    max_tokens: int | None = None,
    window: int = DEFAULT_WINDOW,
    dtype: str = "bfloat16",
    quantization: str | None = None,
    progress: bool = True,
    llm_kwargs: dict | None = None,
    batch_windows: int = 16,
) -> dict:
    """WikiText-2 perplexity of a model directory served by vLLM (see the module docstring for the protocol).

    ``quantization`` is passed to ``vllm.LLM`` (None: whatever config.json says, e.g. superweight_rtn or
    compressed-tensors). ``llm_kwargs`` override the engine arguments (default: eager mode, seed 0,
    max_model_len = the prompt length + 1).
    """
    global ENGINE_STARTED
    _setdefault_env()
    text_path = text_path or default_text_path()
    if not os.path.exists(text_path):
        raise FileNotFoundError(f"{text_path}: WikiText-2 raw test file not found (--data or ${TEXT_ENV})")
    t0 = time.time()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, windows, bos, prompts, n_ctx = _prepare(tokenizer, text_path, window, max_tokens)

    import vllm
    from vllm import LLM, SamplingParams

    kw = dict(
        model=model_dir,
        dtype=dtype,
        max_model_len=len(prompts[0]) + 1,
        enforce_eager=True,
        seed=0,
        enable_prefix_caching=False,
    )
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM's start-up profile run pushes max_num_batched_tokens dummy tokens through the model: on a small
            # CPU that dominates the start. Two windows per scheduler step are plenty for prefill-only scoring.
            kw["max_num_batched_tokens"] = max(1024, 2 * kw["max_model_len"])
    except Exception:  # pragma: no cover
        pass
    if quantization:
        kw["quantization"] = quantization
    kw.update(llm_kwargs or {})
    ENGINE_STARTED = True
    llm = LLM(**kw)
    t_ready = time.time()
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

    nll, count = 0.0, 0
    per_window: list[tuple[float, int]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), unit="win", desc=f"ppl {os.path.basename(os.path.normpath(model_dir))}")
    for b in range(0, len(prompts), batch_windows):
        batch = prompts[b : b + batch_windows]
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
        for p, o in zip(batch, outs, strict=True):
            s, c = nll_sum_from_prompt_logprobs(p, o.prompt_logprobs, n_ctx)
            nll += s
            count += c
            per_window.append((s, c))
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(min(nll / max(count, 1), 700)):.3f}")
    if bar is not None:
        bar.close()
    t_end = time.time()
    try:
        from vllm.platforms import current_platform

        device = current_platform.device_type
    except Exception:  # pragma: no cover
        device = "unknown"
    res = _result(
        nll,
        count,
        ids=ids,
        windows=windows,
        bos=bos,
        window=window,
        text_path=text_path,
        per_window=per_window,
        extra={
            "engine": "vllm",
            "vllm_version": getattr(vllm, "__version__", "?"),
            "device": device,
            "model_dir": os.path.abspath(model_dir),
            "dtype": dtype,
            "quantization": quantization or _config_quant_method(model_dir),
            "seconds_total": round(t_end - t0, 1),
            "seconds_scoring": round(t_end - t_ready, 1),
            "tokens_per_s": round(len(prompts) * len(prompts[0]) / max(t_end - t_ready, 1e-9), 1),
        },
    )
    shutdown_engine(llm)
    del llm
    gc.collect()
    return res


def shutdown_engine(llm) -> None:
    """Stop a vLLM engine explicitly (engine core, then vLLM's distributed state), so that no engine thread is
    left for the interpreter's exit to trip over (``terminate called without an active exception``)."""
    try:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception:  # pragma: no cover - best effort
        pass
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # pragma: no cover - best effort
        pass
    gc.collect()


def exit_now(code: int, hard: bool = False) -> None:
    """Leave the process with ``code`` after flushing stdout/stderr. After a vLLM engine ran, C++ threads of
    vLLM/torch can abort a normal interpreter exit (exit status 134) although every result is written: skip the
    interpreter's teardown then (``os._exit``), or whenever ``hard``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pragma: no cover
            pass
    if hard or ENGINE_STARTED:
        os._exit(code)
    sys.exit(code)


def _config_quant_method(model_dir: str) -> str | None:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            q = json.load(f).get("quantization_config")
        return q.get("quant_method") if q else None
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------
# independent check: plain transformers
# ----------------------------------------------------------------------------------------------------------
def perplexity_transformers(
    model,
    tokenizer,
    *,
    text_path: str | None = None,
    max_tokens: int | None = None,
    window: int = DEFAULT_WINDOW,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """The same perplexity (same text, windows, BOS rule and scored positions) from a transformers forward pass.

    ``model`` is any causal LM (e.g. ``models.load_model(...)`` or ``checkpoint.load_dequantized_model(...)``);
    it runs in its own dtype; log-softmax in float32, NLL summed in float64.
    """
    import torch

    text_path = text_path or default_text_path()
    ids, windows, bos, prompts, n_ctx = _prepare(tokenizer, text_path, window, max_tokens)
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    per_window: list[tuple[float, int]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), unit="win", desc="ppl transformers")
    t0 = time.time()
    with torch.inference_mode():
        for b in range(0, len(prompts), batch_size):
            x = torch.tensor(prompts[b : b + batch_size], dtype=torch.long, device=dev)
            logits = model(input_ids=x).logits  # [B, T, V]
            lp = torch.log_softmax(logits[:, n_ctx - 1 : -1].float(), dim=-1)
            tgt = x[:, n_ctx:]
            tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            nll -= float(tok_lp.double().sum())
            count += tgt.numel()
            for row in tok_lp.double():
                per_window.append((-float(row.sum()), int(row.numel())))
            if bar is not None:
                bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    return _result(
        nll,
        count,
        ids=ids,
        windows=windows,
        bos=bos,
        window=window,
        text_path=text_path,
        per_window=per_window,
        extra={
            "engine": "transformers",
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seconds_total": round(time.time() - t0, 1),
        },
    )


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        _err(f"{message} (see `superweight eval --help`)")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="superweight eval",
        description="WikiText-2 perplexity of a checkpoint through vLLM (prompt log-probabilities). "
        "Fixed protocol: non-overlapping windows, stride = window; first token of each window is context only.",
    )
    p.add_argument("ckpt", metavar="CKPT", help="model directory (superweight_rtn, compressed-tensors or float HF dir)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="window = stride in tokens (default 512)")
    p.add_argument(
        "--max-tokens",
        type=_max_tokens,
        default=None,
        help="use only the first N text tokens (default, or 0: the whole text)",
    )
    p.add_argument("--dtype", default="bfloat16", help="vLLM dtype (default bfloat16)")
    p.add_argument("--quantization", default=None, help="force vLLM's quantization method (default: from config)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the result record to this JSON file")
    p.add_argument(
        "--data", metavar="PATH", default=None, help=f"wiki.test.raw (default: ${TEXT_ENV} or ../shared/data)"
    )
    p.add_argument("--batch-windows", type=int, default=16, help="windows per vLLM generate call (progress step)")
    p.add_argument("--compile", action="store_true", help="let vLLM use torch.compile / CUDA graphs (default eager)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--transformers",
        action="store_true",
        help="also compute the number with plain transformers (float dirs; superweight_rtn checkpoints dequantized)",
    )
    p.add_argument(
        "--transformers-only",
        action="store_true",
        help="only the transformers computation (no vLLM engine): the independent spot check",
    )
    return p


def _transformers_check(ckpt: str, args) -> dict:
    import torch

    dt = getattr(torch, args.dtype) if isinstance(args.dtype, str) and hasattr(torch, args.dtype) else torch.float32
    q = _config_quant_method(ckpt)
    if q == "superweight_rtn":
        from .checkpoint import load_dequantized_model

        model, tok = load_dequantized_model(ckpt, dtype=dt)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt)
        model.eval()
        tok = AutoTokenizer.from_pretrained(ckpt)
    return perplexity_transformers(
        model, tok, text_path=args.data, max_tokens=args.max_tokens, window=args.window, progress=not args.no_progress
    )


def _max_tokens(v: str) -> int | None:
    """``--max-tokens``: a positive count, or 0 for the whole text (as ``benchmarks/quality.py`` takes it)."""
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n or None


def _err(msg: str) -> None:
    print(f"superweight eval: error: {' '.join(str(msg).split())}", file=sys.stderr)


def main(argv=None) -> int:
    """``superweight eval``: 0 on success; on failure one line on stderr and 1 (2: usage, 130: interrupted)."""
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.ckpt):
        _err(f"{args.ckpt}: not a model directory")
        return 2
    from .format import FormatError

    try:
        return _main(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (FormatError, OSError, ValueError) as e:
        _err(str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"{e.filename}: not found")
        return 1
    except Exception as e:  # vLLM / torch failures: one line (their own log is above)
        if envs.debug():
            raise
        _err(f"{type(e).__name__}: {e}")
        return 1


def _main(args) -> int:
    if _config_quant_method(args.ckpt) == "superweight_rtn":
        from .checkpoint import validate_checkpoint

        validate_checkpoint(args.ckpt)  # a bad checkpoint: one clear line before any engine starts
    if args.transformers_only:
        res = _transformers_check(args.ckpt, args)
        res["model_dir"] = os.path.abspath(args.ckpt)
        res["quantization"] = _config_quant_method(args.ckpt)
        print(
            f"{args.ckpt}: transformers ({res['dtype']}) perplexity {res['ppl']:.4f} over {res['tokens']} scored "
            f"tokens ({res['windows']} windows of {res['window']}, stride {res['stride']})"
        )
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    kw = {} if not args.compile else {"enforce_eager": False}
    res = perplexity(
        args.ckpt,
        text_path=args.data,
        max_tokens=args.max_tokens,
        window=args.window,
        dtype=args.dtype,
        quantization=args.quantization,
        progress=not args.no_progress,
        llm_kwargs=kw,
        batch_windows=args.batch_windows,
    )
    if args.transformers:
        res["transformers"] = _transformers_check(args.ckpt, args)
    print(
        f"{args.ckpt}: perplexity {res['ppl']:.4f} over {res['tokens']} scored tokens "
        f"({res['windows']} windows of {res['window']}, stride {res['stride']}; dtype {res['dtype']}, "
        f"quantization {res['quantization']}; {res['seconds_total']} s)"
    )
    if args.transformers:
        t = res["transformers"]
        print(f"  transformers ({t['dtype']}): perplexity {t['ppl']:.4f} over {t['tokens']} tokens")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    exit_now(main())
