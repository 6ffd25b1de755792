#!/usr/bin/env python3
"""Pin every wheel of requirements/cpu-lock.txt by its sha256 (pip's hash-checking mode).

    python scripts/hash-lock.py [LOCK]     # after changing a version in the lock; run with the project venv

Downloads each pinned distribution once (``pip download --no-deps``, served from pip's cache when present) and
rewrites the lock with ``--hash=sha256:...`` under every requirement. pip then refuses any file whose hash differs
(``scripts/setup-env.sh`` installs with ``--require-hashes``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    lock = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "requirements", "cpu-lock.txt")
    text = open(lock).read()
    plain = re.sub(r"\s*\\\n\s*--hash=sha256:[0-9a-f]+", "", text)  # strip old hashes
    with tempfile.TemporaryDirectory() as d:
        req = os.path.join(d, "req.txt")
        with open(req, "w") as f:
            f.write(plain)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-r", req, "-d", d], check=True)
        hashes: dict[str, list[str]] = {}
        for fn in sorted(os.listdir(d)):
            if fn == "req.txt":
                continue
            name = parse_wheel_filename(fn)[0] if fn.endswith(".whl") else parse_sdist_filename(fn)[0]
            with open(os.path.join(d, fn), "rb") as f:
                hashes.setdefault(canonicalize_name(name), []).append(hashlib.sha256(f.read()).hexdigest())
    out = []
    for ln in plain.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==\S+$", ln.strip())
        if m and canonicalize_name(m.group(1)) in hashes:
            ln += "".join(f" \\\n    --hash=sha256:{h}" for h in hashes[canonicalize_name(m.group(1))])
        elif m:
            raise SystemExit(f"no file downloaded for {ln}")
        out.append(ln)
    with open(lock, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"hashed {sum(1 for ln in out if '--hash=' in ln)} requirements in {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
