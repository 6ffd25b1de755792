"""benchmarks/gpu_run.sh (the GPU machine's stages): a typo in it costs a lease, so the tests it names must exist
and the script must parse."""

import ast
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPTS = [os.path.join(ROOT, "benchmarks", name) for name in ("gpu_run.sh", "gpu_eval_ckpt.sh")]


def _from_scripts(find) -> set:
    """The union of ``find(text)`` over the GPU scripts."""
    found: set = set()
    for path in SCRIPTS:
        with open(path) as f:
            found |= find(f.read())
    return found


def _named_tests(text: str) -> set[tuple[str, str]]:
    return set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text))


def test_every_test_the_stages_name_exists():
    named = _from_scripts(_named_tests)
    assert named, "no test node ids found: the pattern no longer matches the script"
    for rel, name in sorted(named):
        with open(os.path.join(ROOT, rel)) as f:
            funcs = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
        assert name in funcs, f"{rel}::{name} named by a GPU stage does not exist"


def test_named_tests_pattern():
    assert _named_tests('pytest "tests/test_a.py::test_b" tests/x/y.py::test_c[1]') == {
        ("tests/test_a.py", "test_b"),
        ("tests/x/y.py", "test_c"),
    }


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_scripts_parse(path):
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0


def _script_flags(text: str) -> set[tuple[str, str]]:
    """(script, --flag) for every ``benchmarks/NAME.py`` call in a shell script, continuation lines joined, up to the
    end of the command (a pipe, ``;``, ``&&``, a redirection or the line's end)."""
    text = text.replace("\\\n", " ")
    out = set()
    for m in re.finditer(r"benchmarks/(\w+)\.py([^\n|;&>]*)", text):
        out |= {(m.group(1), flag) for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2))}
    return out


def test_script_flags_pattern():
    text = 'x benchmarks/a.py --out "$OUT/a.json" \\\n  --ms 2,4 --no-x 2>&1 | tail -3 --nope\n'
    assert _script_flags(text) == {("a", "--out"), ("a", "--ms"), ("a", "--no-x")}


def test_every_flag_the_stages_pass_exists():
    """Each ``--flag`` a GPU stage passes to a benchmarks/ script is one that script's argparse defines (session 28:
    a flag given to the wrong script would have failed that stage on the GPU)."""
    found = _from_scripts(_script_flags)
    assert found, "no benchmark calls found: the pattern no longer matches the script"
    for script, flag in sorted(found):
        with open(os.path.join(ROOT, "benchmarks", script + ".py")) as f:
            src = f.read()
        assert f'"{flag}"' in src, f"benchmarks/{script}.py has no {flag} (passed by a GPU stage)"


def _named_methods(text: str) -> set[str]:
    """Throughput method lists the stages' comments name for the calls after them (a comment line holding only
    comma-separated ``sw-...`` / ``awq`` / ``bf16`` / ``smoothquant`` names, optionally followed by a parenthesis)."""
    out: set[str] = set()
    for line in text.splitlines():
        m = re.match(
            r"\s*#\s+((?:sw-[\w-]+|awq|bf16|smoothquant)(?:,(?:sw-[\w-]+|awq|bf16|smoothquant))*)\s*(\(.*)?$", line
        )
        if m:
            out |= set(m.group(1).split(","))
    return out


def test_every_throughput_method_the_stages_name_exists():
    """The throughput calls a stage's comment prescribes name methods benchmarks/throughput.py defines (a lease
    spent on an unknown method name is lost)."""
    import importlib.util

    named = _from_scripts(_named_methods)
    assert "sw-w4-g128-holdout-qkv-humgemv-panel" in named, "the pattern no longer matches the script"
    spec = importlib.util.spec_from_file_location("throughput", os.path.join(ROOT, "benchmarks", "throughput.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    unknown = sorted(named - set(mod.METHODS) - set(mod.GROUPS))
    assert not unknown, f"methods named by GPU stages that throughput.py does not define: {unknown}"


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("bash", "tar", "gzip", "split", "sha256sum")), reason="needs coreutils"
)
def test_cache_out_then_cache_in_restores_the_kernel_caches(tmp_path):
    """``cache-out all`` packs the kernel caches (FlashInfer's JIT modules among them) and vLLM's compile cache into
    parts; ``cache-in`` (also run by `stash` and `setup`) from a carried .gpu-cache folder restores them byte for byte
    once every part is there, restores the compile cache only over the package sources it was made with, and touches
    nothing while a part is missing."""
    repo, home, out = tmp_path / "repo", tmp_path / "home", tmp_path / "out"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "benchmarks", "gpu_run.sh"), repo / "benchmarks")
    (repo / "vllm_superweight").mkdir()
    (repo / "vllm_superweight" / "a.py").write_text("x = 1\n")
    caches = {
        ".humming/cache/abc/kernel.cubin": os.urandom(3000),
        ".cache/vllm-superweight/cubin/k.cubin": os.urandom(2000),
        ".triton/cache/t/k.json": b"{}",
        ".cache/flashinfer/0.6.14/90a/cached_ops/sampling/sampling.so": os.urandom(1500),
        ".cache/vllm/torch_compile_cache/h/rank_0/code.py": b"print(1)\n",
    }
    for rel, data in caches.items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_bytes(data)

    def stage(*args):
        env = dict(os.environ, HOME=str(home), OUT=str(out), SW_STASH_DIR=str(tmp_path / "stash"))
        env.pop("HUMMING_CACHE_DIR", None)
        env.pop("SUPERWEIGHT_CACHE_DIR", None)
        r = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_run.sh"), *args], env=env, capture_output=True)
        return r.returncode, r.stdout.decode()

    rc, log = stage("cache-out", "all")
    assert rc == 0, log
    parts = sorted(p.name for p in out.iterdir() if p.name.startswith("swcache"))
    assert parts == ["swcache-k.tar.gz.0", "swcache-v.tar.gz.0", "swcache.sha256"], parts
    shutil.rmtree(home)
    carried = repo / ".gpu-cache"
    carried.mkdir()
    shutil.copy(out / "swcache.sha256", carried)
    shutil.copy(out / "swcache-v.tar.gz.0", carried)
    rc, log = stage("cache-in")  # the kernel caches' part not carried yet
    assert rc == 0 and "swcache-v unpacked" in log and not (home / ".humming").exists(), log
    shutil.copy(out / "swcache-k.tar.gz.0", carried)
    rc, log = stage("cache-in")
    assert rc == 0 and "swcache-k unpacked" in log, log
    assert _tree(str(home)) == caches
    # another package source: the kernel caches again, vLLM's compile cache not
    shutil.rmtree(home)
    shutil.rmtree(tmp_path / "stash")
    (repo / "vllm_superweight" / "a.py").write_text("x = 2\n")
    rc, log = stage("cache-in")
    assert rc == 0 and "compile cache skipped" in log, log
    assert _tree(str(home)) == {k: v for k, v in caches.items() if "torch_compile_cache" not in k}
