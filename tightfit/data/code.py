"""The built-in `code` text: Python source from the standard library of the interpreter running tightfit.

A second domain for evaluation (and calibration) that every machine has without a data package.
The selection is fixed: the modules and packages of CODE_MODULES, every `.py` file under them
in sorted path order, test folders left out. They are pure-Python modules that every CPython 3.11
ships (in Debian's libpython3.11-stdlib as in python.org and pyenv builds) and whose files are
byte-identical in 3.11.2 and 3.11.7; modules that 3.12 and 3.13 removed are not among them. The
text is the same on every CPython 3.11 machine; another Python version reads other files, which
`origin` says (figures on it are not comparable with 3.11 ones).
"""

from __future__ import annotations

import platform
import re
import sys
import sysconfig
from pathlib import Path

from tightfit.errors import TextSourceError

CODE_TEXT = "code"
CODE_PYTHON = (3, 11)  # the Python version the selection was made for
# TextCorpus.sha256 of the `code` text on CPython 3.11 (read from 3.11.2 of Debian and 3.11.7 of
# pyenv alike): a text with another fingerprint is not the reference one, and `origin` says so.
CODE_SHA256 = "77527c97e28a9733d1147610688a80db9b64d7ba18eb6ab8ef018e6a960585f8"
CODE_MODULES = (
    "_collections_abc", "_compression", "_markupbase", "_pydecimal", "_pyio", "_strptime", "_threading_local",
    "_weakrefset", "bisect", "bz2", "cmd", "code", "compileall", "copy", "copyreg", "csv", "curses", "difflib",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "genericpath", "getopt", "getpass", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "hmac", "imaplib", "json", "linecache", "lzma", "mailbox", "mimetypes", "modulefinder",
    "netrc", "numbers", "opcode", "operator", "optparse", "os", "pickle", "pickletools", "poplib", "posixpath",
    "pprint", "pstats", "pyclbr", "queue", "random", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "shelve",
    "shlex", "smtplib", "socketserver", "stat", "statistics", "string", "stringprep", "symtable", "tabnanny",
    "textwrap", "tokenize", "tomllib", "tracemalloc", "types", "uuid", "warnings", "weakref", "webbrowser", "wsgiref",
    "xml", "xmlrpc", "zipapp", "zipimport",
)
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
# PEP 8 puts two blank lines between top-level definitions: a file is cut there into documents
# (where the next line starts in the first column, so methods stay inside their class).
TOP_LEVEL_BREAK = re.compile(r"\n\n\n+(?=\S)")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path, module: str) -> list[Path]:
    single = root / f"{module}.py"
    if single.is_file():
        return [single]
    package = root / module
    if not package.is_dir():
        return []
    return [p for p in package.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts)]


def stdlib_files(root: Path | None = None) -> dict[str, str]:
    """Relative path -> source text of every file of the selection, in sorted path order.
    Raises TextSourceError when a module of the selection is missing or a file unreadable."""
    root = stdlib_root() if root is None else Path(root)
    files: list[Path] = []
    missing = []
    for module in CODE_MODULES:
        found = _module_files(root, module)
        files += found
        if not found:
            missing.append(module)
    if missing:
        raise TextSourceError(
            f"built-in text 'code' needs the standard library modules {', '.join(missing)}, not found under {root} "
            f"(Python {platform.python_version()})"
        )
    out = {}
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        try:
            out[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TextSourceError(f"built-in text 'code': cannot read {path} ({e})") from e
    return out


def file_documents(source: str) -> list[str]:
    """One source file cut at its top-level breaks -> its documents (blank ones dropped later)."""
    return TOP_LEVEL_BREAK.split(source)


def code_origin(n_files: int, sha256: str) -> str:
    """One line naming the interpreter whose files were read, and whether the text is the reference one."""
    version = platform.python_version()
    line = f"{platform.python_implementation()} {version} standard library, {n_files} files under {stdlib_root()}"
    if sha256 == CODE_SHA256:
        return line + " (the reference selection)"
    wanted = ".".join(map(str, CODE_PYTHON))
    if sys.version_info[:2] != CODE_PYTHON:
        return line + f"; the selection was made for Python {wanted}, so this text differs: figures are not comparable"
    return line + f"; differs from the reference Python {wanted} selection (a patched standard library?): figures are not comparable"
