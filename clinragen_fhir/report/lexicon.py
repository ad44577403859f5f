"""The test names the rationale checker (`report.faithfulness`) looks for: the graph's lab names
and the record's display texts -> LOINC codes, and the terms that are not lab claims (disorder
names, finding labels). Compiled once per graph version and set of display names (cached), not
once per report.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable

import pandas as pd

from clinragen_fhir.knowledge import KnowledgeGraph

MAX_NAME_CHARS = 120  # a longer display text is no test name anyone writes out
MAX_DISPLAYS_PER_CODE = 8  # distinct display texts per LOINC code taken from the frames


class LabLexicon:
    """Test names -> LOINC codes, longest name first (so "LDL cholesterol (direct)" wins)."""

    def __init__(self, names: dict[str, set[str]], disorder_terms: Iterable[str] = ()) -> None:
        self.names = {k: frozenset(v) for k, v in names.items()
                      if (len(k) >= 3 or k.isupper()) and len(k) <= MAX_NAME_CHARS}
        # disorder names and finding labels are not lab claims ("Body mass index 30+ - obesity",
        # "type 2 diabetes", "eGFR < 60 for >= 90 days")
        terms = sorted({t for t in disorder_terms if len(t) >= 4}, key=len, reverse=True)
        self.disorders = re.compile(r"(?<![\w])(" + "|".join(re.escape(t) for t in terms)
                                    + r")(?![\w])", re.IGNORECASE) if terms else None
        alternatives = sorted(self.names, key=len, reverse=True)
        self.pattern = re.compile(
            r"(?<![\w])(" + "|".join(re.escape(n) for n in alternatives) + r")(?![\w])",
            re.IGNORECASE) if alternatives else None
        self.lower = {k.lower(): v for k, v in self.names.items()}

    @classmethod
    def build(cls, kg: KnowledgeGraph | None = None, frames: Iterable[pd.DataFrame] = (),
              extra: dict[str, str] | None = None) -> LabLexicon:
        """The graph's lab names (and its disorder terms and finding labels, which are not
        claims), the display texts of `frames` and `extra` names. Cached: the graph's part per
        graph version, the compiled lexicon per graph version and set of added names, so a
        worker compiles it once per display vocabulary, not once per report."""
        base, terms = _graph_names(kg)
        added: set[tuple[str, str]] = set()

        def add(name: str, code: str) -> None:
            name = " ".join(str(name).split())
            if name and _is_name(name) and code not in base.get(name, ()):
                added.add((name, code))

        displays: dict[str, int] = {}  # per code: a server can send a new text per reading
        for frame in frames:
            for code, display in frame[["loinc", "display"]].drop_duplicates().itertuples(
                    index=False):
                if displays.get(str(code), 0) >= MAX_DISPLAYS_PER_CODE:
                    continue
                displays[str(code)] = displays.get(str(code), 0) + 1
                add(str(display), str(code))
                add(str(code), str(code))
                # "Hemoglobin A1c/Hemoglobin.total in Blood" is also called "Hemoglobin A1c"
                short = re.split(r"/| \[| in (?:Blood|Serum|Plasma|Urine)", str(display))[0]
                if len(short) >= 6:
                    add(short, str(code))
        for name, code in (extra or {}).items():
            add(name, code)
        key = (kg.version if kg is not None else "", frozenset(added))
        with _cache_lock:
            cached = _lexicons.get(key)
            if cached is not None:
                _lexicons.move_to_end(key)
                return cached
        names = {k: set(v) for k, v in base.items()}
        for name, code in added:
            names.setdefault(name, set()).add(code)
        lexicon = cls(names, terms)
        with _cache_lock:
            _lexicons[key] = lexicon
            while len(_lexicons) > MAX_CACHED_LEXICONS:
                _lexicons.popitem(last=False)
        return lexicon

    def codes(self, name: str) -> frozenset[str]:
        return self.lower.get(" ".join(name.split()).lower(), frozenset())


MAX_CACHED_LEXICONS = 64  # compiled lexicons kept (one per graph version and display set)
_lexicons: OrderedDict[tuple[str, frozenset[tuple[str, str]]], LabLexicon] = OrderedDict()
_graph_cache: dict[str, tuple[dict[str, frozenset[str]], tuple[str, ...]]] = {}
_cache_lock = threading.Lock()


def _is_name(name: str) -> bool:
    """What `LabLexicon` keeps as a test name."""
    return (len(name) >= 3 or name.isupper()) and len(name) <= MAX_NAME_CHARS


def _graph_names(kg: KnowledgeGraph | None) -> tuple[dict[str, frozenset[str]], tuple[str, ...]]:
    """The graph's lab names -> LOINC codes, and the terms that are not lab claims (disorder
    names and synonyms, finding labels), once per graph version."""
    if kg is None:
        return {}, ()
    with _cache_lock:
        if kg.version in _graph_cache:
            return _graph_cache[kg.version]
    from clinragen_fhir.knowledge.retrieval import rule_index

    terms: list[str] = []
    for d in kg.disorders().values():
        terms += [d.term, *d.synonyms]
    # the graph's finding labels name criteria ("HbA1c normal", "Urine protein >= 30 mg/dL");
    # the reading cited after them is the claim
    terms += [f.label for f in rule_index(kg).findings]
    names: dict[str, set[str]] = {}
    for code, lab in kg.labs().items():
        bare = re.sub(r"\s*\([^)]*\)\s*$", "", lab.name)  # "Glucose (blood)" is "Glucose"
        for name in (lab.name, bare, code):
            name = " ".join(str(name).split())
            if name and _is_name(name):
                names.setdefault(name, set()).add(code)
    out = ({k: frozenset(v) for k, v in names.items()}, tuple(terms))
    with _cache_lock:
        _graph_cache[kg.version] = out
    return out
