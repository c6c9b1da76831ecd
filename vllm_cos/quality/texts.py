"""Held-out Python text for the quality benchmark: which files, and their token windows.

Two domains, like the models' training corpora (``../shared/models/README.txt``): general
Python and numeric/ML Python.  Every source is a package (or a folder of one) of this
interpreter's site-packages that

* is not a package group of the models' training corpus (``metadata.json``:
  ``corpus.A.groups`` / ``corpus.B.groups`` name every top-level package the trainer took
  files from; a package that is not there was not on the training machine, or not read),
* is not, and does not hold or sit inside, a text source of CoSD's decision tree
  (``scripts/train_cosd_tree.py``'s defaults, and the ``meta.sources`` of the tree file).

Within a source a file is used only if it passes the trainer's filters (<= 1 MB, UTF-8, lines
<= 2000 characters) and does not say that it was adapted or copied from a package the models
were trained on (Hugging Face transformers, asyncio of the standard library).
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

DOMAINS = ("general", "numeric")
# general Python: pure-Python packages, none of them a training group
GENERAL_SOURCES = ("pydantic", "fastapi", "websockets", "dns", "sentry_sdk", "loguru", "mcp", "cachetools",
                   "jwt", "referencing")
# numeric / ML Python: vLLM (not on the training machine) outside the CoSD tree's folders
NUMERIC_SOURCES = ("vllm/model_executor/models", "vllm/distributed", "vllm/lora", "vllm/v1/worker",
                   "vllm/v1/spec_decode", "vllm/model_executor/model_loader")
DEFAULT_SOURCES = {"general": GENERAL_SOURCES, "numeric": NUMERIC_SOURCES}
# scripts/train_cosd_tree.py's DEFAULT_TEXT (site-packages relative): never evaluated on
COSD_TREE_SOURCES = ("starlette", "uvicorn", "jsonschema", "lark", "vllm/model_executor/layers", "vllm/v1/sample",
                     "vllm/v1/attention", "compressed_tensors")
MAX_FILE_BYTES = 1_000_000  # the zoo trainer's filters
MAX_LINE_CHARS = 2000
# a file that says it is adapted / copied from code the models were trained on
COPIED_MARKERS = re.compile(r"github\.com/huggingface/transformers|HuggingFace Inc|huggingface\.co/"
                            r"|(?:copied|adapted) from asyncio", re.IGNORECASE)


class SelectionError(ValueError):
    """A text source that may have been seen in training (or by the CoSD tree)."""


@dataclass(frozen=True)
class Window:
    domain: str
    source: str  # site-packages relative
    file: str  # site-packages relative
    start: int  # token offset in the file's stream (</s> + the file's tokens)
    token_ids: tuple[int, ...]


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def training_groups(metadata_path: str | Path) -> set[str]:
    """Top-level package names the models' training corpus took files from (both domains)."""
    corpus = json.loads(Path(metadata_path).read_text())["corpus"]
    return {name for domain in corpus.values() for name in domain.get("groups", {})}


def tree_sources(tree_path: str | Path | None) -> set[str]:
    """The CoSD tree's text sources: the trainer's defaults and the tree file's ``meta.sources``."""
    sources = set(COSD_TREE_SOURCES)
    if tree_path is not None and Path(tree_path).is_file():
        sources |= set(json.loads(Path(tree_path).read_text()).get("meta", {}).get("sources", {}))
    return sources


def _overlaps(a: str, b: str) -> bool:
    a, b = a.strip("/"), b.strip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check_sources(sources: Iterable[str], groups: set[str], excluded: set[str]) -> None:
    """Raise :class:`SelectionError` for a source that is a training group or overlaps a CoSD
    tree source."""
    for source in sources:
        top = source.strip("/").split("/")[0]
        if top in groups or top.removesuffix(".py") in groups:
            raise SelectionError(f"{source}: package {top!r} is in the models' training corpus (metadata.json)")
        for other in excluded:
            if _overlaps(source, other):
                raise SelectionError(f"{source}: overlaps {other!r}, a text source of the CoSD tree")


def eligible(text: str | None, size: int) -> bool:
    """The trainer's filters, and no copied-code marker."""
    if text is None or size > MAX_FILE_BYTES or not text.strip():
        return False
    if max(len(line) for line in text.splitlines()) > MAX_LINE_CHARS:
        return False
    return COPIED_MARKERS.search(text) is None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def source_files(site: Path, source: str, excluded: set[str], seed: int) -> list[Path]:
    """A source's eligible Python files outside every excluded folder, in a seeded order."""
    root = site / source
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    kept = [f for f in files
            if not any(_overlaps(str(f.relative_to(site)), e) for e in excluded)
            and eligible(_read(f), f.stat().st_size)]
    random.Random(f"{seed}:{source}").shuffle(kept)
    return kept


def chunk(token_ids: Sequence[int], size: int) -> list[tuple[int, list[int]]]:
    """Consecutive non-overlapping windows of exactly ``size`` tokens (a shorter tail is dropped),
    as (offset, tokens)."""
    if size < 2:
        raise ValueError(f"a window needs at least 2 tokens, got {size}")
    return [(i, list(token_ids[i:i + size])) for i in range(0, len(token_ids) - size + 1, size)]


def domain_windows(domain: str, sources: Sequence[str], encode: Callable[[str], list[int]], count: int,
                   size: int, seed: int, site: Path, excluded: set[str], prefix: Sequence[int] = ()) -> list[Window]:
    """``count`` windows of ``size`` tokens: the sources take turns, each turn one seeded-random
    window of the source's next file (a file is ``prefix`` + its tokens, as in training)."""
    queues = {s: source_files(site, s, excluded, seed) for s in sources}
    rng = random.Random(f"{seed}:{domain}")
    windows: list[Window] = []
    while len(windows) < count and any(queues.values()):
        for source in sources:
            while queues[source] and len(windows) < count:
                path = queues[source].pop(0)
                chunks = chunk(list(prefix) + encode(path.read_text(encoding="utf-8")), size)
                if chunks:
                    start, ids = chunks[rng.randrange(len(chunks))]
                    windows.append(Window(domain, source, str(path.relative_to(site)), start, tuple(ids)))
                    break
    if len(windows) < count:
        raise SelectionError(f"{domain}: only {len(windows)} windows of {size} tokens in {', '.join(sources)}")
    return windows


def select_windows(encode: Callable[[str], list[int]], count: int, size: int, seed: int, metadata_path,
                   tree_path=None, sources: dict | None = None, site: Path | None = None,
                   prefix: Sequence[int] = ()) -> list[Window]:
    """``count`` windows per domain (general first, then numeric), every source checked."""
    sources = sources or DEFAULT_SOURCES
    excluded = tree_sources(tree_path)
    check_sources([s for d in DOMAINS for s in sources[d]], training_groups(metadata_path), excluded)
    site = site or site_packages()
    return [w for d in DOMAINS
            for w in domain_windows(d, sources[d], encode, count, size, seed, site, excluded, prefix)]
