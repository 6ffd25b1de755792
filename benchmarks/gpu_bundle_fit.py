"""Re-split the vLLM bundle for the GPU machine so that every call that carries a part fits the device tool's limit.

A device call carries the working tree (files git tracks, plus untracked ones it does not ignore) and the paths named
in ``carry``, 64 MiB in all. ``../shared/gpu/make-vllm-bundle`` cuts the bundle into 56 MiB parts, which no longer fit
beside this repository's tree (8.8 MiB at session 51); the last part also travels with ``.gpu-bundle/tok`` (the
tokenizer, 3.4 MiB). This script measures the tree, picks the fewest parts that fit (the last one with ``--last-extra``
beside it), rewrites ``part-NN.d/part-NN`` in place, checks that the parts still concatenate to the same bytes, and
prints each call's carry list::

    python benchmarks/gpu_bundle_fit.py                 # .gpu-bundle, 64 MiB, tok with the last part
    python benchmarks/gpu_bundle_fit.py --dry-run       # the plan only

Nothing is replaced until the new parts are written and verified (a failure leaves the old parts as they were).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import BinaryIO

MIB = 1 << 20


def tree_bytes(repo: str) -> int:
    """Bytes of what a device call sends besides ``carry``: tracked files and untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    total = 0
    for rel in filter(None, out.split(b"\0")):
        path = os.path.join(repo, os.fsdecode(rel))
        if os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
    return total


def dir_bytes(path: str) -> int:
    if not os.path.exists(path):
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def parts_of(bundle: str) -> list[str]:
    """The bundle's part files in concatenation order (``part-NN.d/part-NN``, or bare ``part-NN``)."""
    found = []
    for name in sorted(os.listdir(bundle)):
        path = os.path.join(bundle, name)
        if name.startswith("part-") and name.endswith(".d") and os.path.isdir(path):
            found += [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.startswith("part-")]
        elif name.startswith("part-") and os.path.isfile(path):
            found.append(path)
    return found


def plan(total: int, room: int, last_extra: int) -> list[int]:
    """Part sizes: the fewest parts with every part <= ``room`` and the last + ``last_extra`` <= ``room``, the
    others as equal as can be. Raises ValueError when no split fits."""
    if total <= 0:
        raise ValueError("the bundle is empty")
    cap_last = room - last_extra
    if cap_last <= 0:
        raise ValueError(f"no room: {room / MIB:.1f} MiB a call, {last_extra / MIB:.1f} MiB beside the last part")
    if total <= cap_last:
        return [total]
    n = 1 + -(-(total - cap_last) // room)
    last = min(cap_last, -(-total // n))
    q, rem = divmod(total - last, n - 1)
    return [q + 1] * rem + [q] * (n - 1 - rem) + [last]


def _md5_of(paths: list[str]) -> str:
    h = hashlib.md5()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(MIB), b""):
                h.update(chunk)
    return h.hexdigest()


def resplit(bundle: str, sizes: list[int]) -> list[str]:
    """Rewrite the parts with ``sizes``; returns the new part paths. The new parts are written and verified beside
    the old ones first; the swap moves the old ones aside and puts them back if it fails."""
    old = parts_of(bundle)
    stage = tempfile.mkdtemp(prefix=".resplit-", dir=bundle)
    try:
        new_dir, old_dir = os.path.join(stage, "new"), os.path.join(stage, "old")
        os.makedirs(old_dir)
        written = []
        src = _Concat(old)
        try:
            for i, size in enumerate(sizes):
                d = os.path.join(new_dir, f"part-{i:02d}.d")
                os.makedirs(d)
                path = os.path.join(d, f"part-{i:02d}")
                with open(path, "wb") as f:
                    left = size
                    while left:
                        chunk = src.read(min(left, 8 * MIB))
                        if not chunk:
                            raise RuntimeError("the bundle ended early")
                        f.write(chunk)
                        left -= len(chunk)
                written.append(path)
            if src.read(1):
                raise RuntimeError("the plan does not cover the whole bundle")
        finally:
            src.close()
        if _md5_of(written) != src.md5.hexdigest():  # the old bytes, hashed as they were copied
            raise RuntimeError("the new parts do not concatenate to the old bytes")
        # what to move aside: each old part's folder (part-NN.d) or the bare part file
        movable = sorted({p if os.path.dirname(p) == bundle else os.path.dirname(p) for p in old})
        moved: list[str] = []
        placed: list[str] = []
        try:
            for m in movable:
                os.replace(m, os.path.join(old_dir, os.path.basename(m)))
                moved.append(m)
            for path in written:
                d = os.path.dirname(path)
                dest = os.path.join(bundle, os.path.basename(d))
                os.replace(d, dest)
                placed.append(dest)
        except OSError:
            for dest in placed:
                shutil.rmtree(dest, ignore_errors=True)
            for m in moved:
                os.replace(os.path.join(old_dir, os.path.basename(m)), m)
            raise
        return [os.path.join(dest, os.path.basename(dest)[: -len(".d")]) for dest in placed]
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class _Concat:
    """The parts read as one stream, hashed (md5) as they are read."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self.md5 = hashlib.md5()
        self.f: BinaryIO | None = None

    def read(self, n: int) -> bytes:
        while True:
            if self.f is None:
                if not self.paths:
                    return b""
                self.f = open(self.paths.pop(0), "rb")
            data = self.f.read(n)
            if data:
                self.md5.update(data)
                return data
            self.f.close()
            self.f = None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".", help="the checkout the device tool sends")
    ap.add_argument("--bundle", default=".gpu-bundle")
    ap.add_argument("--limit-mib", type=float, default=64.0, help="what one call may carry in all")
    ap.add_argument("--margin-mib", type=float, default=1.0, help="kept free (install.sh, files added before the call)")
    ap.add_argument("--last-extra", action="append", default=None, help="carried with the last part (default: tok)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    bundle = os.path.join(args.repo, args.bundle) if not os.path.isabs(args.bundle) else args.bundle
    old = parts_of(bundle) if os.path.isdir(bundle) else []
    if not old:
        print(
            f"no bundle parts under {bundle} (build them: ../shared/gpu/make-vllm-bundle {args.bundle})",
            file=sys.stderr,
        )
        return 2
    extras = args.last_extra if args.last_extra is not None else [os.path.join(args.bundle, "tok")]
    extra = sum(dir_bytes(os.path.join(args.repo, e)) for e in extras)
    install = dir_bytes(os.path.join(bundle, "install.sh"))
    tree = tree_bytes(args.repo)
    room = int(args.limit_mib * MIB) - tree - install - int(args.margin_mib * MIB)
    total = sum(os.path.getsize(p) for p in old)
    try:
        sizes = plan(total, room, extra)
    except ValueError as e:
        print(f"cannot fit: {e} (tree {tree / MIB:.1f} MiB, bundle {total / MIB:.1f} MiB)", file=sys.stderr)
        return 1
    print(
        f"tree {tree / MIB:.1f} MiB, bundle {total / MIB:.1f} MiB, room a call {room / MIB:.1f} MiB, "
        f"with the last part {extra / MIB:.1f} MiB: {len(sizes)} parts of " + ", ".join(f"{s / MIB:.1f}" for s in sizes)
    )
    in_folders = all(os.path.basename(os.path.dirname(p)) == os.path.basename(p) + ".d" for p in old)
    if in_folders and [os.path.getsize(p) for p in old] == sizes:
        print("the parts already have these sizes: nothing to do")
    elif args.dry_run:
        print("dry run: nothing written")
        return 0
    else:
        resplit(bundle, sizes)
    inst = os.path.join(args.bundle, "install.sh")
    for i in range(len(sizes)):
        carry = [os.path.join(args.bundle, f"part-{i:02d}.d"), inst] + (extras if i == len(sizes) - 1 else [])
        print(f"call {i + 1}: carry {carry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
