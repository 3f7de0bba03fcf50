"""`builtin:fortunes-multilingual`: every installed Debian fortunes language package as one
corpus (text, language, topic), for clustering texts by language at a larger scale than
`builtin:fortunes`.

Most packages put their files in a folder of the fortunes root; fortunes-br and fortunes-zh
put theirs beside the English files, which is why English is the root's files less theirs.
Files are UTF-8 in current packages; older releases used a national encoding, tried next;
a file neither decodes is skipped and counted.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from runstore.errors import InputError

FORTUNE_ROOT = Path("/usr/share/games/fortunes")
MIN_LANGUAGES = 8
MIN_CHARS = 20  # shorter entries (signatures, stray lines) are not texts worth a row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FortunePackage:
    language: str  # ISO 639-1
    package: str  # the Debian package
    folder: str | None  # its folder under the root; None: files in the root itself
    root_files: tuple[str, ...] = ()  # its files in the root
    legacy: str | None = None  # the encoding of its older releases


PACKAGES = (
    FortunePackage("en", "fortunes", None),
    FortunePackage("de", "fortunes-de", "de", legacy="latin-1"),
    FortunePackage("es", "fortunes-es", "es", legacy="latin-1"),
    FortunePackage("it", "fortunes-it", "it", legacy="latin-1"),
    FortunePackage("pl", "fortunes-pl", "pl", legacy="iso8859-2"),
    FortunePackage("ru", "fortunes-ru", "ru", legacy="koi8-r"),
    FortunePackage("cs", "fortunes-cs", "cs", legacy="iso8859-2"),  # Czech and Slovak
    FortunePackage("pt", "fortunes-br", None, ("brasil",), legacy="latin-1"),
    FortunePackage("bg", "fortunes-bg", "bg", legacy="cp1251"),
    FortunePackage("eo", "fortunes-eo", "eo", legacy="iso8859-3"),
    FortunePackage("ga", "fortunes-ga", "ga", legacy="latin-1"),
    FortunePackage("zh", "fortunes-zh", None, ("chinese", "song100", "tang300"),
                   legacy="gb18030"),
)
OTHER_ROOT_FILES = frozenset(name for package in PACKAGES for name in package.root_files)
"""Files other languages' packages put in the root: not English."""
# Offensive fortunes are left out, as in builtin:fortunes.
OFFENSIVE = {"off", "es/off"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # fortunes-zh colours its titles


def _is_data(path: Path) -> bool:
    """A fortune file: not a link (fortunes-it links its files into the root, fortunes-cs
    into cz/ and sk/), not an index (.dat) or a UTF-8 alias (.u8)."""
    return path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8")


def package_files(root: Path, package: FortunePackage) -> list[Path]:
    """The package's fortune files present under `root`, sorted."""
    if package.root_files:
        return [root / name for name in package.root_files if _is_data(root / name)]
    folder = root if package.folder is None else root / package.folder
    if not folder.is_dir():
        return []
    return [path for path in sorted(folder.iterdir()) if _is_data(path)
            and path.relative_to(root).as_posix() not in OFFENSIVE
            and (package.folder is not None or path.name not in OTHER_ROOT_FILES)]


def installed_languages(root: Path) -> list[str]:
    """The languages with fortune files under `root` (listed, not read)."""
    return [package.language for package in PACKAGES if package_files(root, package)]


def decoded(data: bytes, legacy: str | None) -> str | None:
    """The file's text: UTF-8, else the package's older encoding; None if neither fits."""
    for encoding in ("utf-8", legacy):
        if encoding is None:
            continue
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return None


def entries(text: str) -> list[str]:
    """The fortunes of a file (separated by lines holding only %), colour codes removed."""
    out = []
    for entry in _ANSI.sub("", text).replace("\r\n", "\n").split("\n%\n"):
        entry = entry.strip().strip("%").strip()
        if len(entry) >= MIN_CHARS:
            out.append(entry)
    return out


@dataclass
class FortuneCorpus:
    rows: list[dict[str, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # files unread or not decoded
    languages: dict[str, int] = field(default_factory=dict)  # rows per language


def read_corpus(root: Path) -> FortuneCorpus:
    corpus = FortuneCorpus()
    for package in PACKAGES:
        for path in package_files(root, package):
            try:
                text = decoded(path.read_bytes(), package.legacy)
            except OSError:  # unreadable: counted like an undecodable file
                text = None
            if text is None:
                corpus.skipped.append(path)
                continue
            topic = path.name.removesuffix(".fortunes")
            for entry in entries(text):
                corpus.rows.append({"text": entry, "language": package.language,
                                    "topic": topic})
                corpus.languages[package.language] = (
                    corpus.languages.get(package.language, 0) + 1)
    return corpus


def _check_languages(found: list[str], root: Path) -> None:
    if len(found) < MIN_LANGUAGES:
        missing = [package.package for package in PACKAGES if package.language not in found]
        raise InputError("data.source", f"builtin:fortunes-multilingual needs fortunes in "
                         f"at least {MIN_LANGUAGES} languages under {root}; found "
                         f"{len(found)} ({', '.join(found) or 'none'}); install the missing "
                         f"Debian packages: sudo apt-get install {' '.join(missing)}")


def check_installed(root: Path | None = None) -> None:
    """Bad input unless MIN_LANGUAGES languages have files (listed, not read): what
    `islands validate` checks."""
    root = FORTUNE_ROOT if root is None else root
    _check_languages(installed_languages(root), root)


def read_multilingual_fortunes(root: Path | None = None) -> list[dict[str, str]]:
    """The rows of every installed language, at least MIN_LANGUAGES of them."""
    root = FORTUNE_ROOT if root is None else root  # read at call time: tests move it
    corpus = read_corpus(root)
    if corpus.skipped:
        log.warning("builtin:fortunes-multilingual: skipped %d file(s) in no known "
                    "encoding (or unreadable): %s", len(corpus.skipped),
                    ", ".join(str(path) for path in corpus.skipped))
    _check_languages(list(corpus.languages), root)
    return corpus.rows
