"""Domain texts for the tiny model kit, cut into documents.

Three domains, one per source model, all readable offline:

* ``code``: Python source of a fixed list of standard-library modules of the running
  interpreter (PSF licence). The list is fixed rather than discovered so that the text does not
  depend on which extra modules a machine happens to have; missing modules are skipped.
* ``scripture``: a slice of the King James Bible (public domain) shipped as
  ``kit/corpus/scripture.txt``: Genesis, Ruth, Proverbs, Ecclesiastes and Jonah, one verse a
  line, from Debian's ``bible-kjv`` package (dumped with its ``bible`` program, verse references
  removed).
* ``prose``: English prose about Python, the ``topics`` dict of the standard library's
  ``pydoc_data.topics`` (PSF licence).

The texts come from the interpreter, so a kit built under another Python version differs.
Everything else here is a pure function of the seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "CODE_MODULES",
    "DOMAINS",
    "Document",
    "Domain",
    "DomainPools",
    "cut_documents",
    "domain_units",
    "split_pools",
    "sub_seed",
    "write_corpus",
    "write_heldout",
]

Domain = Literal["code", "scripture", "prose"]
DOMAINS: Final[tuple[Domain, ...]] = ("code", "scripture", "prose")

# Common, mostly pure-Python modules present in every CPython 3.11+ (a few became packages in
# later versions; both spellings are tried). Sorted so the order never depends on a listing.
CODE_MODULES: Final[tuple[str, ...]] = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "inspect",
    "ipaddress",
    "json",
    "json.decoder",
    "json.encoder",
    "logging",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pprint",
    "queue",
    "random",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "tarfile",
    "textwrap",
    "threading",
    "tokenize",
    "traceback",
    "typing",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
)

# Document lengths in characters: most documents are log-uniform in [_MIN_DOC, _MAX_DOC]; a few
# are long on purpose (well over 1000 tokens for every kit tokenizer) so that a downstream
# splitter has work to do.
_MIN_DOC: Final = 200
_MAX_DOC: Final = 4000
_LONG_DOC: Final = (5000, 9000)
_LONG_PROB: Final = 0.05


@dataclass(frozen=True)
class Document:
    """One document of a domain.

    Attributes:
        domain: The domain the text comes from.
        text: The document text (never empty; the kit adds empty documents on purpose only
            to the pipeline corpus).
    """

    domain: Domain
    text: str


@dataclass(frozen=True)
class DomainPools:
    """The documents of one domain, split into disjoint pools.

    Attributes:
        domain: The domain.
        train: Documents the models may train on; the pipeline corpus is drawn from these too.
        heldout: Documents no model and no pipeline corpus ever sees.
    """

    domain: Domain
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]


def sub_seed(seed: int, name: str) -> int:
    """Derives an independent 63-bit seed for one component of the kit.

    A hash rather than ``seed + k`` so that neighbouring seeds give unrelated streams, and
    rather than ``hash()`` so that it does not depend on ``PYTHONHASHSEED``.

    Args:
        seed: The kit seed.
        name: The component, e.g. ``"model:src_llama"``.

    Returns:
        A non-negative integer below 2**63.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _head(text: str, max_chars: int | None) -> str:
    """Returns at most ``max_chars`` of ``text``, cut after the last whole line."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1] if cut > 0 else text[:max_chars]


def _code_units(max_chars: int | None) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    units: list[str] = []
    for module in CODE_MODULES:
        rel = Path(*module.split("."))
        for candidate in (rel.with_suffix(".py"), rel / "__init__.py"):
            path = stdlib / candidate
            if path.is_file():
                units.append(_head(path.read_text(encoding="utf-8"), max_chars))
                break
    if not units:
        raise FileNotFoundError(f"no standard-library sources found under {stdlib}")
    return units


def _prose_units(max_chars: int | None) -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it from minimal Pythons
        raise RuntimeError(
            "the 'prose' domain needs the standard library's pydoc_data.topics module, which "
            "this Python lacks (install the full standard library, e.g. Debian's "
            "libpython3-stdlib, or use a python.org / pyenv build)"
        ) from exc
    return [_head(topics[key], max_chars) for key in sorted(topics)]


def _scripture_units(max_chars: int | None) -> list[str]:
    text = resources.files("fusion_etl.kit").joinpath("corpus/scripture.txt").read_text("utf-8")
    # One unit per book, so that documents never run from one book into the next.
    books = ["The Book of" + part for part in text.split("The Book of") if part.strip()]
    return [_head(book, max_chars) for book in books]


def domain_units(domain: Domain, *, max_chars_per_unit: int | None = None) -> list[str]:
    """Returns the raw text of a domain as natural units (files, topics, books).

    Args:
        domain: Which domain.
        max_chars_per_unit: Keep only the head of each unit, cut at a line boundary; ``None``
            keeps everything. Small kits use this to train fast on a spread of units.

    Returns:
        The units in a fixed order.

    Raises:
        RuntimeError: ``prose`` was asked for and ``pydoc_data`` is missing.
        FileNotFoundError: ``code`` was asked for and no standard-library source was found.
    """
    if domain == "code":
        return _code_units(max_chars_per_unit)
    if domain == "prose":
        return _prose_units(max_chars_per_unit)
    if domain == "scripture":
        return _scripture_units(max_chars_per_unit)
    raise ValueError(f"unknown domain {domain!r}")


def _draw_length(rng: random.Random) -> int:
    if rng.random() < _LONG_PROB:
        return rng.randint(*_LONG_DOC)
    return round(math.exp(rng.uniform(math.log(_MIN_DOC), math.log(_MAX_DOC))))


def cut_documents(units: Iterable[str], *, domain: Domain, seed: int) -> list[Document]:
    """Cuts units into documents of varied length at line boundaries.

    Args:
        units: Texts to cut; a document never spans two units.
        domain: Recorded on every document.
        seed: Seeds the lengths.

    Returns:
        Documents in unit order; none is empty or whitespace-only. The first one is long
        (5000 to 9000 characters) when the first unit is long enough.
    """
    rng = random.Random(sub_seed(seed, f"cut:{domain}"))
    docs: list[Document] = []
    # The very first document is always long, so that even a small kit has one per domain.
    goal = rng.randint(*_LONG_DOC)
    for unit in units:
        pieces: list[str] = []
        current: list[str] = []
        size = 0
        for line in unit.splitlines(keepends=True):
            current.append(line)
            size += len(line)
            if size >= goal:
                pieces.append("".join(current))
                current, size, goal = [], 0, _draw_length(rng)
        rest = "".join(current)
        goal = _draw_length(rng)
        # A short tail would be a near-useless document: glue it to the previous one.
        if pieces and len(rest) < _MIN_DOC:
            pieces[-1] += rest
        elif rest:
            pieces.append(rest)
        for piece in pieces:
            text = piece.strip("\n")
            if text.strip():
                docs.append(Document(domain=domain, text=text))
    return docs


def split_pools(docs: Sequence[Document], *, n_heldout: int, seed: int) -> DomainPools:
    """Splits one domain's documents into a training pool and a held-out pool.

    Args:
        docs: Documents of a single domain.
        n_heldout: How many go to the held-out pool (drawn at random, seeded, among documents
            of ordinary length).
        seed: Seeds the draw.

    Returns:
        The two pools; the training pool keeps the original document order.

    Raises:
        ValueError: Too few documents, or documents of several domains.
    """
    if not docs:
        raise ValueError("no documents to split")
    domain = docs[0].domain
    if any(doc.domain != domain for doc in docs):
        raise ValueError("split_pools expects documents of a single domain")
    # Long documents stay in training, where the pipeline corpus needs them.
    candidates = [i for i, doc in enumerate(docs) if len(doc.text) <= _MAX_DOC]
    if n_heldout >= len(candidates):
        raise ValueError(f"{domain}: {len(docs)} documents cannot leave {n_heldout} held out")
    rng = random.Random(sub_seed(seed, f"heldout:{domain}"))
    held = set(rng.sample(candidates, n_heldout))
    return DomainPools(
        domain=domain,
        train=tuple(doc for i, doc in enumerate(docs) if i not in held),
        heldout=tuple(doc for i, doc in enumerate(docs) if i in held),
    )


def _write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    # ASCII escapes keep every row on one physical line even for readers that also split on
    # U+2028 and friends (str.splitlines does).
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def write_corpus(
    out_dir: Path,
    pools: Sequence[DomainPools],
    *,
    docs_per_domain: int,
    long_per_domain: int,
    n_files: int,
    seed: int,
) -> int:
    """Writes the pipeline corpus: ``part-NNNNN.jsonl`` files of ``{"text": ...}`` rows.

    Each domain contributes its ``long_per_domain`` longest training documents plus a seeded
    sample of others. One empty document and one whitespace-only document are added on purpose,
    so that a downstream stage can show that it drops them.

    Args:
        out_dir: Existing folder to write into.
        pools: One entry per domain.
        docs_per_domain: Documents per domain, long ones included.
        long_per_domain: Of those, how many are the domain's longest.
        n_files: Number of files; the documents are shuffled and dealt round-robin.
        seed: Seeds the sample and the shuffle.

    Returns:
        The number of rows written.
    """
    rng = random.Random(sub_seed(seed, "corpus"))
    chosen: list[str] = []
    for pool in pools:
        by_length = sorted(range(len(pool.train)), key=lambda i: (-len(pool.train[i].text), i))
        longest = by_length[:long_per_domain]
        others = sorted(set(range(len(pool.train))) - set(longest))
        picked = longest + rng.sample(others, min(len(others), docs_per_domain - len(longest)))
        chosen.extend(pool.train[i].text for i in sorted(picked))
    rng.shuffle(chosen)
    # Deliberately degenerate rows near the front of the first two files.
    chosen.insert(0, "")
    chosen.insert(min(1, len(chosen)), " \n\t \n")
    for k in range(n_files):
        rows = [{"text": text} for text in chosen[k::n_files]]
        _write_jsonl(out_dir / f"part-{k:05d}.jsonl", rows)
    return len(chosen)


def write_heldout(out_dir: Path, pools: Sequence[DomainPools]) -> int:
    """Writes ``<domain>.jsonl`` files of ``{"text": ..., "domain": ...}`` held-out rows.

    Args:
        out_dir: Existing folder to write into.
        pools: One entry per domain.

    Returns:
        The number of rows written.
    """
    total = 0
    for pool in pools:
        rows = [{"text": doc.text, "domain": doc.domain} for doc in pool.heldout]
        _write_jsonl(out_dir / f"{pool.domain}.jsonl", rows)
        total += len(rows)
    return total
