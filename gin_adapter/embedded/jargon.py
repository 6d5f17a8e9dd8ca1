"""An out-of-domain English corpus for forgetting checks: the Jargon File (Debian package ``jargon-text``).

About 2,300 lexicon entries (239k words, public domain): modern English, a domain (hacker slang and computing
folklore) and a register (dictionary definitions) that Wikipedia intros do not train. ``scripts/setup.sh`` fetches
it once with ``python -m gin_adapter.embedded.jargon fetch`` (``apt-get download jargon-text``, then the package is
unpacked with ``dpkg-deb``); the text lands in :func:`jargon_path`. Nothing is fetched at run time.

    from gin_adapter.embedded.jargon import load_jargon_entries
    entries = load_jargon_entries()      # [(headword, "headword: definition ..."), ...]
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .smollm2 import cache_dir

logger = logging.getLogger(__name__)

JARGON_PACKAGE = "jargon-text"
JARGON_MEMBER = "usr/share/doc/jargon-text/jargon.txt.gz"
_ENTRY = re.compile(r"^   :(?P<head>[^:]+):(?P<rest>.*)$")


def jargon_path() -> Path:
    """Where the fetched text lives: ``$GIN_ADAPTER_JARGON`` if set, else ``<cache_dir>/jargon.txt.gz``."""
    env = os.environ.get("GIN_ADAPTER_JARGON")
    return Path(env).expanduser() if env else cache_dir() / "jargon.txt.gz"


def fetch_jargon(dest: Path | None = None) -> Path:
    """Download the Debian package into a temporary folder, unpack its text, move it to ``dest`` atomically."""
    dest = dest or jargon_path()
    if dest.is_file():
        return dest
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"fetching the Jargon File needs {tool} (a Debian-based system); or set GIN_ADAPTER_JARGON to a copy of {JARGON_MEMBER}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        download = ["apt-get", "download", JARGON_PACKAGE]
        if subprocess.run(download, cwd=work, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)  # a fresh machine has no lists
            subprocess.run(download, cwd=work, check=True, capture_output=True)
        package = next(Path(work).glob(f"{JARGON_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(package), str(Path(work) / "x")], check=True)
        staging = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(Path(work) / "x" / JARGON_MEMBER, staging)
        os.replace(staging, dest)
    return dest


def parse_entries(text: str) -> list[tuple[str, str]]:
    """The lexicon's entries as ``(headword, "headword: definition")``, lines unwrapped, ``{cross-ref}`` braces dropped.

    An entry starts at a line ``   :headword: ...`` and runs to the next one; the lexicon ends at "Appendix A".
    """
    entries: list[tuple[str, list[str]]] = []
    for line in text.split("\nAppendix A.")[0].splitlines():
        match = _ENTRY.match(line)
        if match:
            entries.append((match["head"].strip(), [match["rest"].strip()]))
        elif entries and line.strip():
            entries[-1][1].append(line.strip())
    clean = []
    for head, lines in entries:
        body = re.sub(r"[{}]", "", " ".join(part for part in lines if part))
        clean.append((head, f"{head}: {body}".strip()))
    return clean


def load_jargon_entries(path: Path | None = None) -> list[tuple[str, str]]:
    """Every lexicon entry of the fetched Jargon File, or a clear error saying how to fetch it."""
    path = path or jargon_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"The out-of-domain corpus is not at {path}. Run `bash scripts/setup.sh` (or `python -m "
            "gin_adapter.embedded.jargon fetch`) once on a Debian-based machine, or set GIN_ADAPTER_JARGON to a copy "
            f"of {JARGON_MEMBER} from the {JARGON_PACKAGE} package."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return parse_entries(handle.read())


if __name__ == "__main__":  # python -m gin_adapter.embedded.jargon fetch
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m gin_adapter.embedded.jargon fetch")
    logging.basicConfig(level=logging.INFO)
    logger.info("Jargon File at %s (%d entries)", fetch_jargon(), len(load_jargon_entries()))
