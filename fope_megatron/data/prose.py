"""A real-prose corpus found on every machine that runs this project: the docstrings of Python's
own standard library, read from its source files with ``ast`` (nothing is imported or executed).

Why these: a fresh Debian Python image has almost no man pages (``/usr/share/man`` holds only a
few translated pages) and ``/usr/share/doc`` is mostly copyright files, but the interpreter's
``lib/python3.X`` is always complete. One document per module: its docstring, then every class
and function docstring in source order, each headed by its qualified name. The text is English
technical prose with code fragments; it depends only on the Python version (recorded in the
manifest with a SHA-256 of each output file).

Documents are split into train and held-out by a hash of the module name (``heldout_share``), so
the split does not depend on the order files are found in and held-out modules are never seen
by training.

    python -m fope_megatron.data.prose --out DIR [--heldout-share 0.1] [--max-docs N]

writes ``DIR/prose_train.jsonl``, ``DIR/prose_heldout.jsonl``, their ``fope-preprocess`` outputs
``DIR/prose_train`` / ``DIR/prose_heldout`` (byte tokenizer) and ``DIR/prose_manifest.json``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
MIN_CHARS = 400


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def module_document(path: Path, name: str) -> str | None:
    """The docstrings of one module as prose, or None when it has too little."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {name}.\n\n{doc.strip()}")

    def walk(node, prefix: str) -> None:
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                d = ast.get_docstring(child)
                if d and not child.name.startswith("_"):
                    kind = "Class" if isinstance(child, ast.ClassDef) else "Function"
                    parts.append(f"{kind} {name}.{qual}.\n\n{d.strip()}")
                if isinstance(child, ast.ClassDef):
                    walk(child, qual + ".")

    walk(tree, "")
    text = "\n\n".join(parts)
    return text if len(text) >= MIN_CHARS else None


def is_heldout(name: str, share: float) -> bool:
    """Deterministic split by module name."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return h / 2**64 < share


def stdlib_documents(
    root: Path | None = None, max_docs: int | None = None
) -> list[tuple[str, str]]:
    """``(module name, text)`` for every stdlib module with enough docstring text, sorted by
    path (the first ``max_docs`` only when given)."""
    root = root or stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        if max_docs is not None and len(docs) >= max_docs:
            break
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        name = _module_name(root, path)
        text = module_document(path, name)
        if text:
            docs.append((name, text))
    return docs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_prose_corpus(
    out_dir: str | Path, heldout_share: float = 0.1, max_docs: int | None = None, workers: int = 1
) -> dict:
    """Write the train / held-out JSONL and their preprocessed prefixes; returns the manifest."""
    from fope_megatron.data.preprocess import preprocess

    if not 0.0 < heldout_share < 1.0:
        raise ValueError(f"heldout_share must be in (0, 1), got {heldout_share}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(max_docs=max_docs)
    split = {"train": [], "heldout": []}
    for name, text in docs:
        split["heldout" if is_heldout(name, heldout_share) else "train"].append((name, text))
    manifest = {
        "source": "docstrings of the Python standard library (ast, no import)",
        "python": sys.version.split()[0],
        "stdlib": str(stdlib_root()),
        "heldout_share": heldout_share,
    }
    for part, items in split.items():
        if not items:
            raise ValueError(f"the {part} part is empty ({len(docs)} documents); use more")
        jsonl = out / f"prose_{part}.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for _, text in items:
                f.write(json.dumps({"text": text}) + "\n")
        preprocess([jsonl], out / f"prose_{part}", tokenizer="byte", workers=workers)
        manifest[part] = {
            "documents": len(items),
            "bytes": sum(len(t.encode()) for _, t in items),
            "prefix": str(out / f"prose_{part}"),
            "sha256": _sha256(jsonl),
            "first_modules": [n for n, _ in items[:5]],
        }
    (out / "prose_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--heldout-share", type=float, default=0.1)
    p.add_argument("--max-docs", type=int, default=None, help="first N modules only (tests)")
    args = p.parse_args(argv)
    m = build_prose_corpus(args.out, args.heldout_share, args.max_docs)
    print(json.dumps({k: m[k] for k in ("python", "train", "heldout")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
