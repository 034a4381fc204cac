"""No layer reads another's private attributes (issue 14.2): contracts are public methods.

The decorator, the LangChain handler, the tools and recovery count through ``StreamBase``'s
public counting API (``reserve`` / ``commit`` / ``cancel`` / ``record_up_to`` / ``can_pay`` /
``units_left``); stores are reached through the ``Store`` contract. This test greps the package
for the reaches that existed before (``stream._meter``, ``s._committed``, ``_Record`` fields,
SQLite's ``_LIVE``) and for their shapes in general.
"""

from __future__ import annotations

import re
from pathlib import Path

import pf_metered

ROOT = Path(pf_metered.__file__).parent

# (pattern, the only module allowed to use it (relative to the package), why)
RULES: list[tuple[str, str | None, str]] = [
    (r"(?<![.\w])(?:stream|s|st|streams?\[\w+\])\._[a-z]\w*", None, "a stream's private attribute"),
    (r"(?<![.\w])\w*stream\w*\._[a-z]\w*", None, "a private attribute of a *stream* variable"),
    (r"(?<!pf_metered)\.\w*stream\w*\._[a-z]\w*", None, "a private attribute of a held stream"),
    (r"(?<!self)\._meter\b", None, "a stream's private meter"),
    (r"\._committed\b", None, "the stream's old private wake-up"),
    (r"\b_Record\b", "meter/store.py", "the in-memory store's private record"),
    (r"\b_LIVE\b", None, "a store module's private registry"),
    (r"getattr\(\s*[\w.]+\s*,\s*['\"]_[a-z]", None, "a private attribute probed by name"),
]


def _defines_live(rel: str) -> bool:
    """A store module (``meter/<name>_store.py``) keeps its own registry of live stores for
    the exit flush; a new store module needs no entry here."""
    return rel.startswith("meter/") and rel.endswith("_store.py")


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Source lines without comments and docstring-ish prose lines (``>>>``-free heuristic:
    a line whose stripped text starts with a quote or is inside a triple-quoted block)."""
    out: list[tuple[int, str]] = []
    in_doc = False
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0] if "#" in line and '"' not in line.split("#", 1)[0] else line
        quotes = text.count('"""') + text.count("'''")
        if in_doc:
            if quotes % 2:
                in_doc = False
            continue
        if quotes % 2:
            in_doc = True
            continue
        if quotes:  # a one-line docstring
            continue
        out.append((no, text))
    return out


def test_no_cross_module_private_reaches() -> None:
    found: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for no, text in _code_lines(path):
            for pattern, allowed, why in RULES:
                if allowed == rel or (pattern == r"\b_LIVE\b" and _defines_live(rel)):
                    continue
                for match in re.finditer(pattern, text):
                    found.append(f"{rel}:{no}: {match.group(0)!r} ({why})")
    assert not found, "\n".join(found)


def test_the_rules_catch_what_they_name() -> None:
    """The patterns are live: each one matches the reach it was written for."""
    samples = [
        "meter = stream._meter",
        "s._committed(total)",
        "self.stream._committed(total)",  # the handler's old probe, through its attribute
        "woken = self.input_stream._woken",
        "output_stream._store.add(n)",
        "if isinstance(counter, _Record):",
        "for store in list(sqlite_mod._LIVE):",
        'woken = getattr(stream, "_committed", None)',
        'dialect = getattr(self._client, "_dialect", None)',
    ]
    for sample in samples:
        assert any(re.search(p, sample) for p, _, _ in RULES), sample


def _reaches(path: Path) -> list[str]:
    return [
        match.group(0)
        for _, text in _code_lines(path)
        for pattern, _, _ in RULES
        for match in re.finditer(pattern, text)
    ]


def test_a_probe_in_the_callback_handler_would_be_caught(tmp_path: Path) -> None:
    """Issue 15 item 2: the handler once probed the stream's ``_committed``. Its source with
    such probes put back (in code, past its docstrings) fails the scan; as it is, it passes."""
    source = (ROOT / "langchain" / "callbacks.py").read_text(encoding="utf-8")
    assert _reaches(ROOT / "langchain" / "callbacks.py") == []
    probes = [
        "        self.stream._committed(total)\n",
        '        woken = getattr(self.stream, "_committed", None)\n',
        "        left = self.output_stream._meter.units_left()\n",
    ]
    anchor = "        prompt = [m for batch in messages for m in batch]\n"
    assert anchor in source
    for probe in probes:
        probed = tmp_path / "callbacks.py"
        probed.write_text(source.replace(anchor, anchor + probe), encoding="utf-8")
        assert _reaches(probed), probe
