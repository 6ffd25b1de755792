"""A held-out evaluation text that neither WikiText-2 nor the selection text (Python-docs prose) is: the English
prose of the installed packages' PyPI descriptions (``*.dist-info/METADATA`` bodies), sorted by package name,
paragraphs that are mostly words (code, tables and link lists dropped). Deterministic for one environment; the
file's sha256 goes into every record made from it.

    python benchmarks/diag/unseen_text.py OUT.txt [--site-packages DIR] [--max-chars N]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import sysconfig
from pathlib import Path

WORD = re.compile(r"[A-Za-z][a-z']+")


def prose_paragraphs(body: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", body):
        lines = [ln.strip() for ln in para.splitlines()]
        if not lines or any(ln.startswith(("```", "    ", ">>>", "$ ", "|", "..", "[!")) for ln in para.splitlines()):
            continue
        text = " ".join(ln.lstrip("#*-> ").strip() for ln in lines if ln)
        text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)  # markdown links -> their text
        text = re.sub(r"https?://\S+", "", text)
        words = WORD.findall(text)
        if len(words) < 12 or len(words) < 0.6 * len(text.split()):
            continue
        if sum(text.count(ch) for ch in "=(){}[];<>_`") > 0.01 * len(text):  # code, markup
            continue
        out.append(re.sub(r"\s+", " ", text).strip())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--site-packages", default=sysconfig.get_paths()["purelib"])
    ap.add_argument("--max-chars", type=int, default=400_000)
    a = ap.parse_args(argv)
    paras: list[str] = []
    seen: set[str] = set()
    for meta in sorted(Path(a.site_packages).glob("*.dist-info/METADATA"), key=lambda p: p.parent.name.lower()):
        raw = meta.read_text(encoding="utf-8", errors="replace")
        body = raw.split("\n\n", 1)[1] if "\n\n" in raw else ""
        for p in prose_paragraphs(body):
            if p not in seen and "wikitext" not in p.lower():
                seen.add(p)
                paras.append(p)
    text = "\n\n".join(paras)[: a.max_chars]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n", encoding="utf-8")
    digest = hashlib.sha256(text.encode() + b"\n").hexdigest()
    print(f"{a.out}: {len(paras)} paragraphs, {len(text):,} characters, sha256 {digest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
