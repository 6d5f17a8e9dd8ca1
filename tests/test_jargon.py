"""The out-of-domain corpus (the Jargon File): entry parsing and the error when it was never fetched."""

from __future__ import annotations

import gzip

import pytest

from gin_adapter.embedded.jargon import load_jargon_entries, parse_entries

SNIPPET = """Glossary

   :bar: /bar/, n.

   1. The second {metasyntactic variable}, after {foo}
   and before {baz}.

   :camelCase:

   See {PascalCasing}.

Appendix A. Hacker Folklore

   :not an entry: folklore text
"""


def test_entries_are_unwrapped_and_stop_at_the_appendix(tmp_path):
    entries = parse_entries(SNIPPET)
    assert entries == [
        ("bar", "bar: /bar/, n. 1. The second metasyntactic variable, after foo and before baz."),
        ("camelCase", "camelCase: See PascalCasing."),
    ]
    path = tmp_path / "jargon.txt.gz"
    path.write_bytes(gzip.compress(SNIPPET.encode()))
    assert load_jargon_entries(path) == entries


def test_missing_corpus_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GIN_ADAPTER_JARGON", str(tmp_path / "absent.txt.gz"))
    with pytest.raises(FileNotFoundError, match="scripts/setup.sh.*GIN_ADAPTER_JARGON"):
        load_jargon_entries()
