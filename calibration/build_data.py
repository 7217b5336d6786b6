#!/usr/bin/env python3
"""Build tforge's shipped calibration and evaluation text sets.

What
    Writes three files into the output folder (by default, the folder that
    holds this script):

    * ``calibration.jsonl`` -- 512 English sentences, used to collect
      activation statistics when a model is quantized;
    * ``evaluation.jsonl`` -- 256 other English sentences, used to compare
      a compiled or quantized model against the original one;
    * ``PROVENANCE.json`` -- how the two files were made: the Python
      version, the module list, the counts, the sha256 of each file and the
      licence of the source text.

    Each line of a ``.jsonl`` file is one JSON object ``{"text": "..."}``.
    The two sets are disjoint, and no two selected sentences are equal or
    near-duplicates of each other.

Why
    Quantization needs some representative text, and tests and users need a
    small evaluation set that is always at hand. Shipping a data set that was
    scraped from the web raises licence and reproducibility questions; the
    docstrings of the Python standard library do not: they are ordinary
    English prose, they are present offline on every machine that has the
    same Python version, and anyone can rebuild the files from them and
    verify the result byte for byte (``--check``).

Source and licence
    The docstrings of a fixed, explicit, sorted list of pure-Python standard
    library modules (``MODULES`` below) of CPython. They are part of the
    CPython distribution and are covered by the PSF License Agreement for
    Python, version 2 (SPDX: PSF-2.0).

How
    For every module in ``MODULES`` (a module that cannot be imported is
    skipped and recorded), the script collects, with ``inspect.getdoc``, the
    docstring of the module, of its public classes and functions whose
    ``__module__`` is that module, and of the public methods and properties
    those classes define themselves, always visiting names in sorted order
    (the few objects that exist only on some platforms or builds, listed in
    ``EXCLUDED``, are left out).
    Docstrings are cut into paragraphs of plain, unindented lines (indented
    lines, lists, doctests and section underlines are dropped), paragraphs
    into sentences, and only clean English prose is kept (see
    ``is_clean_sentence``). Sentences are deduplicated case-insensitively,
    ordered by the sha256 of their text, and taken greedily in that order,
    skipping near-duplicates of those already taken, until 512 + 256 are
    found: the first 512 form the calibration set, the next 256 the
    evaluation set. Nothing depends on dict or set order, on ``hash()`` or on
    a random generator, and no timestamps are written.

Python version
    Docstrings change between Python versions -- between minor versions
    and, less often, between bugfix releases too (3.11.2 and 3.11.7 give
    different pools) -- so the output depends on the exact Python version it
    is built with (CPython 3.11.7 for the shipped files). ``PROVENANCE.json``
    records it, and ``--check`` says so when it is run with another one. The
    script refuses to run under ``python -OO``, which strips docstrings.

Usage
    python calibration/build_data.py             # rebuild in place
    python calibration/build_data.py --out DIR   # build into DIR
    python calibration/build_data.py --check     # verify the shipped files

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
import warnings

CALIBRATION_SIZE = 512
EVALUATION_SIZE = 256
CALIBRATION_FILE = "calibration.jsonl"
EVALUATION_FILE = "evaluation.jsonl"
PROVENANCE_FILE = "PROVENANCE.json"
OUTPUT_FILES = (CALIBRATION_FILE, EVALUATION_FILE, PROVENANCE_FILE)

SOURCE = "Docstrings of the CPython standard library modules listed in 'modules'"
PYTHON_VERSION = "{}.{}.{}".format(*sys.version_info[:3])
LICENCE = "PSF-2.0 (PSF License Agreement for Python, version 2)"

# Pure-Python modules, present in every regular CPython 3.11 build, whose
# public API does not depend on the platform (no os, subprocess, shutil,
# socket, tempfile, ...) nor on an optional C library (no sqlite3, ssl, lzma,
# bz2, tkinter, curses, readline, ...), and that import without deprecation
# warnings. Keep the list sorted; changing it changes the output.
MODULES = (
    "abc",
    "argparse",
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.locks",
    "asyncio.queues",
    "asyncio.runners",
    "asyncio.streams",
    "asyncio.taskgroups",
    "asyncio.tasks",
    "base64",
    "bdb",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "collections",
    "concurrent.futures.process",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "dis",
    "email.charset",
    "email.feedparser",
    "email.generator",
    "email.header",
    "email.headerregistry",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "ftplib",
    "functools",
    "getopt",
    "glob",
    "graphlib",
    "gzip",
    "heapq",
    "hmac",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib.abc",
    "importlib.metadata",
    "importlib.resources.abc",
    "importlib.util",
    "inspect",
    "ipaddress",
    "json",
    "json.decoder",
    "linecache",
    "logging",
    "logging.config",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "numbers",
    "optparse",
    "pathlib",
    "pdb",
    "pickletools",
    "pkgutil",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pyclbr",
    "pydoc",
    "queue",
    "random",
    "re",
    "runpy",
    "sched",
    "shlex",
    "smtplib",
    "statistics",
    "symtable",
    "tarfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest.case",
    "unittest.loader",
    "unittest.mock",
    "unittest.result",
    "unittest.runner",
    "unittest.suite",
    "urllib.error",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "wsgiref.handlers",
    "wsgiref.headers",
    "xml.dom.minidom",
    "xml.dom.pulldom",
    "xml.sax.handler",
    "xml.sax.saxutils",
    "xml.sax.xmlreader",
    "xmlrpc.client",
    "xmlrpc.server",
    "zipfile",
    "zipimport",
)

# Public objects of the modules above that only exist on some platforms or
# builds (without ssl, on Windows, ...): leave them out so that the output is
# the same everywhere. Found by looking for definitions under "if" or "try" at
# module or class level.
EXCLUDED = frozenset(
    {
        "asyncio.streams.open_unix_connection",
        "asyncio.streams.start_unix_server",
        "ftplib.FTP_TLS",
        "http.client.HTTPSConnection",
        "imaplib.IMAP4_SSL",
        "poplib.POP3_SSL",
        "smtplib.SMTP_SSL",
        "threading.Thread.native_id",
    }
)

# --------------------------------------------------------------------------
# Collecting docstrings
# --------------------------------------------------------------------------


def _unwrap(member):
    """Return the function behind a staticmethod, classmethod or property."""
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    if isinstance(member, property):
        return member.fget
    return member


def _is_documentable(obj) -> bool:
    return inspect.isclass(obj) or inspect.isroutine(obj)


def _getdoc(obj) -> str | None:
    try:
        return inspect.getdoc(obj)
    except Exception:  # a broken __doc__ descriptor: skip the object
        return None


def collect_docstrings(module) -> list[str]:
    """Docstrings of ``module`` and of what it defines, in a fixed order."""
    name = module.__name__
    docs = []
    doc = _getdoc(module)
    if doc:
        docs.append(doc)
    namespace = vars(module)
    for attr in sorted(namespace):
        if attr.startswith("_"):
            continue
        obj = namespace[attr]
        if not _is_documentable(obj) or getattr(obj, "__module__", None) != name:
            continue
        if f"{name}.{attr}" in EXCLUDED:
            continue
        doc = _getdoc(obj)
        if doc:
            docs.append(doc)
        if not inspect.isclass(obj):
            continue
        members = vars(obj)
        for member_name in sorted(members):
            if member_name.startswith("_"):
                continue
            if f"{name}.{attr}.{member_name}" in EXCLUDED:
                continue
            member = _unwrap(members[member_name])
            if member is None or not _is_documentable(member):
                continue
            # A member without a __module__ (a C method) belongs to its class.
            if getattr(member, "__module__", name) != name:
                continue
            doc = _getdoc(member)
            if doc:
                docs.append(doc)
    return docs


def import_modules(names):
    """Import ``names`` in order; return (modules, names that failed)."""
    modules, missing = [], []
    for modname in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modules.append(importlib.import_module(modname))
        except ImportError:
            missing.append(modname)
    return modules, missing


# --------------------------------------------------------------------------
# From docstrings to sentences
# --------------------------------------------------------------------------

_UNDERLINE = re.compile(r"^[-=~^*+#]{3,}$")
_LIST_ITEM = re.compile(r"^(?:[-*+\u2022o]\s|\d+[.)]\s|[a-zA-Z][.)]\s|\(\w+\)\s)")
_FIELD = re.compile(r"^:\w|^@\w|^\.\.\s")
_SECTION = re.compile(r"^\w[\w ]*:$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ABBREVIATIONS = (
    "e.g.",
    "i.e.",
    "etc.",
    "vs.",
    "cf.",
    "Mr.",
    "Mrs.",
    "Dr.",
    "St.",
    "No.",
    "approx.",
    "resp.",
    "viz.",
    "al.",
)


def paragraphs(doc: str):
    """Yield blocks of consecutive plain lines, each joined into one string.

    Blank lines, indented lines (code, argument descriptions, list
    continuations), list items, doctest lines, reST fields and directives,
    section headers and underlines end a block and are dropped.
    """
    block: list[str] = []
    for line in doc.splitlines():
        plain = (
            line.strip()
            and not line[0].isspace()
            and not line.startswith((">>>", "..."))
            and not _LIST_ITEM.match(line)
            and not _FIELD.match(line)
            and not _SECTION.match(line.strip())
            and not _UNDERLINE.match(line.strip())
        )
        if plain:
            block.append(line.strip())
        else:
            if block:
                yield " ".join(block)
            block = []
    if block:
        yield " ".join(block)


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences, keeping common abbreviations."""
    pieces = _SENTENCE_END.split(text)
    sentences: list[str] = []
    for piece in pieces:
        if sentences and sentences[-1].endswith(_ABBREVIATIONS):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def normalise(sentence: str) -> str:
    return " ".join(sentence.split())


# Characters and patterns that mark code, markup or references, not prose.
_FORBIDDEN_SUBSTRINGS = (
    ">>>",
    "::",
    "==",
    "()",
    "{",
    "}",
    "[",
    "]",
    "\\",
    "|",
    "`",
    "__",
    "=",
    "*",
    "\t",
    "->",
    "<",
    ">",
    "#",
    "@",
    "$",
    "%",
    "~",
    "^",
    "&",
    "..",
    '"',
    ":",
    "/",
    "--",
    "http",
    "www.",
    "://",
    ".py",
    "XXX",
    "TODO",
    "FIXME",
)
_CODE_PATTERNS = (
    re.compile(r"\w_|_\w"),  # snake_case identifiers
    re.compile(r"[A-Za-z]\.[A-Za-z_]"),  # dotted names (os.path, self.x)
    re.compile(r"\w\("),  # calls: f(x)
    re.compile(r"\(\s*\)|\(\W"),  # empty or odd parentheses
    re.compile(r"[a-z][A-Z]"),  # camelCase / CamelCase words
    re.compile(r"(?:^|\s)'|'(?:\s|[.,;!?)]|$)"),  # quoted literals
    re.compile(r"\d[A-Za-z]|[A-Za-z]\d"),  # identifiers such as utf8, x1
    re.compile(r"\s[,.;!?]|[,;]\S"),  # detached or glued punctuation
    re.compile(r"(?:^|\s)-"),  # options and negative numbers
    re.compile(r"\([^)]*,[^)]*\)"),  # tuples: (name, value)
    re.compile(r"(?:^|\s)(?![aAI]\b)[A-Za-z]\b(?!')"),  # variables: n, x
    re.compile(
        r"\b(?:self|cls|args|kwargs|kwds|arg|obj|func|str|int|bool|"
        r"dict|tuple|bytes|len|repr|isinstance|stdin|stdout|stderr|"
        r"sys|os|argv)\b"
    ),
    re.compile(r"\b(?:above|below|following|follows|example)\b", re.I),  # context
)
# Acronyms that read as ordinary English words in these docstrings.
_ALLOWED_ACRONYMS = frozenset(
    {
        "API",
        "ASCII",
        "CSV",
        "DNS",
        "FTP",
        "GUI",
        "HTML",
        "HTTP",
        "HTTPS",
        "ID",
        "IMAP",
        "IP",
        "JSON",
        "MIME",
        "OK",
        "OS",
        "POP",
        "RFC",
        "SMTP",
        "SSL",
        "TCP",
        "TLS",
        "UDP",
        "URL",
        "URLs",
        "UTC",
        "UUID",
        "XML",
        "ZIP",
        "CPU",
        "CPUs",
        "IO",
        "EOF",
    }
)
_RUN_ON = re.compile(r"(\S+)[.!?]\s+[a-z]")
_ACRONYM = re.compile(r"\b[A-Z][A-Z0-9]+s?\b")
_START_STOPWORDS = (
    "See ",
    "Note ",
    "Deprecated",
    "Example",
    "Usage ",
    "For example",
    "For instance",
    "Also ",
    "And ",
    "Or ",
    "But ",
    "This is a ",
    "This is the ",
)

MIN_WORDS = 6
MAX_WORDS = 40
MIN_LETTER_RATIO = 0.85


def is_clean_sentence(sentence: str) -> bool:
    """True when ``sentence`` (already normalised) reads as English prose."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not ("A" <= sentence[0] <= "Z") or not sentence.endswith("."):
        return False
    if sentence.endswith(_ABBREVIATIONS) and not sentence.endswith("etc."):
        return False
    if not sentence.isascii() or not sentence.isprintable():
        return False
    if any(s in sentence for s in _FORBIDDEN_SUBSTRINGS):
        return False
    if any(p.search(sentence) for p in _CODE_PATTERNS):
        return False
    # Two sentences run together ("... the replacement repl. repl can be ...").
    if any(word + "." not in _ABBREVIATIONS for word in _RUN_ON.findall(sentence)):
        return False
    if any(a not in _ALLOWED_ACRONYMS for a in _ACRONYM.findall(sentence)):
        return False
    if sentence.startswith(_START_STOPWORDS):
        return False
    visible = [c for c in sentence if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters < MIN_LETTER_RATIO * len(visible):
        return False
    # The first word must be an ordinary capitalised word, not a name such as
    # "True", "None" or a class name.
    first = words[0].rstrip(",;")
    if not (first[:1].isupper() and first[1:].islower()) and first not in ("A", "I"):
        return False
    return first not in ("True", "False", "None")


def sentence_pool(modules) -> list[str]:
    """Clean, case-insensitively unique sentences, in sha256 order."""
    seen = set()
    pool = []
    for module in modules:
        for doc in collect_docstrings(module):
            for paragraph in paragraphs(doc):
                for raw in split_sentences(paragraph):
                    sentence = normalise(raw)
                    if not is_clean_sentence(sentence):
                        continue
                    key = sentence.lower()
                    if key in seen:
                        continue
                    seen.add(key)
                    pool.append(sentence)
    pool.sort(key=lambda s: (sha256_hex(s.encode("utf-8")), s))
    return pool


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------

NEAR_DUPLICATE_JACCARD = 0.6


def _word_set(sentence: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", sentence.lower()))


def select(pool: list[str], count: int) -> list[str]:
    """Take ``count`` sentences from ``pool`` in order, skipping near-duplicates.

    A sentence is a near-duplicate of an already selected one when their
    lowercase text without punctuation is equal or their word sets have a
    Jaccard similarity of at least ``NEAR_DUPLICATE_JACCARD``.
    """
    chosen: list[str] = []
    chosen_sets: list[frozenset[str]] = []
    chosen_keys: set[str] = set()
    for sentence in pool:
        key = " ".join(re.findall(r"[a-z0-9']+", sentence.lower()))
        if key in chosen_keys:
            continue
        words = _word_set(sentence)
        if any(
            len(words & other) >= NEAR_DUPLICATE_JACCARD * len(words | other)
            for other in chosen_sets
        ):
            continue
        chosen.append(sentence)
        chosen_sets.append(words)
        chosen_keys.add(key)
        if len(chosen) == count:
            return chosen
    raise SystemExit(
        f"build_data.py: only {len(chosen)} distinct sentences were found, "
        f"{count} are needed; add modules to MODULES"
    )


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jsonl_bytes(sentences: list[str]) -> bytes:
    lines = [json.dumps({"text": s}, ensure_ascii=False, sort_keys=True) for s in sentences]
    return ("\n".join(lines) + "\n").encode("utf-8")


def build(out_dir: str) -> dict:
    """Build the three files into ``out_dir``; return the provenance record."""
    modules, missing = import_modules(MODULES)
    pool = sentence_pool(modules)
    selected = select(pool, CALIBRATION_SIZE + EVALUATION_SIZE)
    calibration = selected[:CALIBRATION_SIZE]
    evaluation = selected[CALIBRATION_SIZE:]

    # The invariants the consumers rely on.
    assert len(calibration) == CALIBRATION_SIZE
    assert len(evaluation) == EVALUATION_SIZE
    assert not {s.lower() for s in calibration} & {s.lower() for s in evaluation}
    assert len({s.lower() for s in evaluation}) == EVALUATION_SIZE

    data = {
        CALIBRATION_FILE: jsonl_bytes(calibration),
        EVALUATION_FILE: jsonl_bytes(evaluation),
    }
    provenance = {
        "description": "tforge calibration and evaluation text sets, built by "
        "calibration/build_data.py",
        "source": SOURCE,
        "licence": LICENCE,
        "python_implementation": sys.implementation.name,
        "python_version": PYTHON_VERSION,
        "modules": list(MODULES),
        "modules_missing": missing,
        "excluded_objects": sorted(EXCLUDED),
        "pool_size": len(pool),
        "counts": {CALIBRATION_FILE: len(calibration), EVALUATION_FILE: len(evaluation)},
        "sha256": {name: sha256_hex(blob) for name, blob in data.items()},
        "selection": "sentences ordered by sha256 of their UTF-8 text; the "
        "first 512 that are not near-duplicates of an earlier one "
        "form the calibration set, the next 256 the evaluation set",
    }
    data[PROVENANCE_FILE] = (
        json.dumps(provenance, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    ).encode("utf-8")

    os.makedirs(out_dir, exist_ok=True)
    for name, blob in data.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(blob)
    provenance["file_sha256"] = {name: sha256_hex(blob) for name, blob in data.items()}
    return provenance


def summary(provenance: dict) -> str:
    counts = provenance["counts"]
    digests = " ".join(f"{name}={digest}" for name, digest in provenance["file_sha256"].items())
    return (
        f"modules={len(provenance['modules']) - len(provenance['modules_missing'])}"
        f"/{len(provenance['modules'])} pool={provenance['pool_size']} "
        f"calibration={counts[CALIBRATION_FILE]} "
        f"evaluation={counts[EVALUATION_FILE]} "
        f"python={PYTHON_VERSION} sha256: {digests}"
    )


def check(out_dir: str) -> int:
    """Rebuild into a temporary folder and compare with ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        provenance = build(tmp)
        differing = []
        for name in OUTPUT_FILES:
            path = os.path.join(out_dir, name)
            try:
                with open(path, "rb") as f:
                    shipped = f.read()
            except OSError:
                differing.append(f"{name} (missing)")
                continue
            with open(os.path.join(tmp, name), "rb") as f:
                if f.read() != shipped:
                    differing.append(name)
    print(summary(provenance))
    if not differing:
        print(f"build_data.py --check: OK, {out_dir} is reproducible")
        return 0
    hint = ""
    try:
        with open(os.path.join(out_dir, PROVENANCE_FILE), encoding="utf-8") as f:
            built_with = json.load(f).get("python_version")
        if built_with != PYTHON_VERSION:
            hint = (
                f"; the files were built with Python {built_with} and this "
                f"is Python {PYTHON_VERSION}: docstrings differ between "
                f"Python versions, run the check with Python {built_with}"
            )
    except (OSError, ValueError, AttributeError):
        pass
    print(
        f"build_data.py --check: FAILED, rebuilt files differ from those in "
        f"{out_dir}: {', '.join(differing)}{hint}",
        file=sys.stderr,
    )
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Build tforge's calibration and evaluation text sets from "
        "the docstrings of the Python standard library."
    )
    parser.add_argument(
        "--out",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="output folder (default: this script's folder)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temporary folder and exit 1 if the "
        "result differs from the files in --out",
    )
    args = parser.parse_args(argv)
    if sys.flags.optimize >= 2:
        print("build_data.py: docstrings are stripped under -OO; run without it", file=sys.stderr)
        return 2
    if args.check:
        return check(args.out)
    print(summary(build(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
