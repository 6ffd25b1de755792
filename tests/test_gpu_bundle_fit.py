"""benchmarks/gpu_bundle_fit.py: the bundle re-split so that each device call's carry fits."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_bundle_fit as fit  # noqa: E402

KIB = 1024


def _repo(tmp_path, tracked_bytes: int, parts: list[int], tok_bytes: int):
    """A git checkout with one tracked file, an ignored .gpu-bundle of bare parts (random bytes) and a tok folder."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "big.bin").write_bytes(os.urandom(tracked_bytes))
    (repo / ".gitignore").write_text("/.gpu-bundle/\n")
    subprocess.run(["git", "-C", str(repo), "add", "big.bin", ".gitignore"], check=True)
    b = repo / ".gpu-bundle"
    b.mkdir()
    data = os.urandom(sum(parts))
    off = 0
    for i, n in enumerate(parts):
        (b / f"part-{i:02d}").write_bytes(data[off : off + n])
        off += n
    (b / "install.sh").write_text("#!/bin/sh\n")
    (b / "tok").mkdir()
    (b / "tok" / "tokenizer.json").write_bytes(os.urandom(tok_bytes))
    return repo, data


def _concat(paths):
    return b"".join(open(p, "rb").read() for p in paths)


def test_plan_takes_the_fewest_parts_that_fit():
    assert fit.plan(100, 50, 0) == [50, 50]
    # the last part also carries 20: two parts would leave it 50 + 20 > 50, so three
    sizes = fit.plan(100, 50, 20)
    assert sum(sizes) == 100 and len(sizes) == 3 and max(sizes) <= 50 and sizes[-1] + 20 <= 50
    assert fit.plan(10, 50, 5) == [10]
    assert fit.plan(100, 50, 20) == [35, 35, 30]
    rng = random.Random(0)
    for _ in range(2000):
        room = rng.randint(1, 300)
        extra, total = rng.randint(0, room - 1), rng.randint(1, 2000)
        s = fit.plan(total, room, extra)
        assert sum(s) == total and min(s) > 0 and max(s) <= room and s[-1] + extra <= room
        assert len(s) == 1 or (len(s) - 2) * room + room - extra < total  # one part fewer could not hold it
    with pytest.raises(ValueError, match="no room"):
        fit.plan(100, 20, 20)
    with pytest.raises(ValueError, match="empty"):
        fit.plan(0, 20, 0)


def test_tree_bytes_counts_tracked_and_unignored_files_only(tmp_path):
    repo, _ = _repo(tmp_path, 3000, [500], 100)
    (repo / "new.txt").write_bytes(b"x" * 700)  # untracked, not ignored: the device tool sends it
    n = fit.tree_bytes(str(repo))
    assert n == 3000 + len("/.gpu-bundle/\n") + 700  # the ignored bundle is not counted


def test_resplit_fits_every_call_and_keeps_the_bytes(tmp_path, capsys):
    repo, data = _repo(tmp_path, 100 * KIB, [300 * KIB, 300 * KIB, 100 * KIB], 40 * KIB)
    limit_mib = 0.5  # 512 KiB a call: the tree takes ~100, install.sh and no margin
    rc = fit.main(["--repo", str(repo), "--limit-mib", str(limit_mib), "--margin-mib", "0"])
    assert rc == 0
    parts = fit.parts_of(str(repo / ".gpu-bundle"))
    assert [os.path.basename(p) for p in parts] == [f"part-{i:02d}" for i in range(len(parts))]
    assert all(os.path.basename(os.path.dirname(p)) == os.path.basename(p) + ".d" for p in parts)
    assert _concat(parts) == data
    room = int(limit_mib * fit.MIB) - fit.tree_bytes(str(repo)) - len("#!/bin/sh\n")
    sizes = [os.path.getsize(p) for p in parts]
    assert max(sizes) <= room and sizes[-1] + 40 * KIB <= room
    assert len(sizes) == len(fit.plan(len(data), room, 40 * KIB))
    out = capsys.readouterr().out
    assert f"call {len(parts)}: carry" in out and "tok" in out.splitlines()[-1]
    assert not [n for n in os.listdir(repo / ".gpu-bundle") if n.startswith(".resplit-")]
    # a second run finds nothing to do and leaves the parts alone
    mtimes = [os.path.getmtime(p) for p in parts]
    assert fit.main(["--repo", str(repo), "--limit-mib", str(limit_mib), "--margin-mib", "0"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert [os.path.getmtime(p) for p in fit.parts_of(str(repo / ".gpu-bundle"))] == mtimes


def test_cannot_fit_says_so_and_changes_nothing(tmp_path, capsys):
    repo, data = _repo(tmp_path, 600 * KIB, [200 * KIB, 200 * KIB], 10 * KIB)
    before = sorted(os.listdir(repo / ".gpu-bundle"))
    assert fit.main(["--repo", str(repo), "--limit-mib", "0.5", "--margin-mib", "0"]) == 1
    assert "cannot fit" in capsys.readouterr().err
    assert sorted(os.listdir(repo / ".gpu-bundle")) == before
    assert _concat(fit.parts_of(str(repo / ".gpu-bundle"))) == data


def test_dry_run_writes_nothing(tmp_path, capsys):
    repo, data = _repo(tmp_path, 10 * KIB, [300 * KIB, 300 * KIB], 10 * KIB)
    assert fit.main(["--repo", str(repo), "--limit-mib", "0.25", "--margin-mib", "0", "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out
    # bare parts that already have the planned sizes are still moved into the part-NN.d folders the carry names
    (tmp_path / "b").mkdir()
    repo2, _ = _repo(tmp_path / "b", 10 * KIB, [100 * KIB], 1 * KIB)
    assert fit.main(["--repo", str(repo2), "--limit-mib", "1", "--margin-mib", "0"]) == 0
    assert [os.path.relpath(p, repo2) for p in fit.parts_of(str(repo2 / ".gpu-bundle"))] == [
        os.path.join(".gpu-bundle", "part-00.d", "part-00")
    ]
    assert sorted(os.listdir(repo / ".gpu-bundle")) == ["install.sh", "part-00", "part-01", "tok"]


def test_a_failed_swap_puts_the_old_parts_back(tmp_path, monkeypatch):
    repo, data = _repo(tmp_path, 10 * KIB, [300 * KIB, 300 * KIB], 10 * KIB)
    bundle = str(repo / ".gpu-bundle")
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        # the old parts move aside (2 calls), then the first new part folder fails to land
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk trouble")
        return real(src, dst)

    monkeypatch.setattr(fit.os, "replace", flaky)
    with pytest.raises(OSError, match="disk trouble"):
        fit.resplit(bundle, [200 * KIB, 200 * KIB, 200 * KIB])
    monkeypatch.setattr(fit.os, "replace", real)
    assert sorted(os.listdir(bundle)) == ["install.sh", "part-00", "part-01", "tok"]
    assert _concat(fit.parts_of(bundle)) == data


def test_no_bundle_is_a_clear_error(tmp_path, capsys):
    repo, _ = _repo(tmp_path, 10, [10], 1)
    for p in fit.parts_of(str(repo / ".gpu-bundle")):
        os.remove(p)
    assert fit.main(["--repo", str(repo)]) == 2
    assert "make-vllm-bundle" in capsys.readouterr().err
