"""Teachers: who writes the rationales the student is distilled from.

* `KnowledgeTeacher` (offline default, "knowledge-grounded-v1"): deterministic text from the
  graph retrieval over the example's own inputs. Every lab value it cites is a reading of the
  example's lab frame, written "NAME VALUE UNIT on DATE, DIRECTION"; where the inputs do not
  support a label it says so ("no lab evidence for X") instead of inventing support.
* `LLMTeacher`: any OpenAI-compatible chat endpoint (`training.llm`), one prompt per stage. Its
  answers pass `check_agreement` or are rejected and counted, never stored.

Both know the labels (that is distillation); both must justify them from the inputs only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pandas as pd

from clinragen_fhir.encoding.features import reading_texts
from clinragen_fhir.encoding.schema import Note
from clinragen_fhir.knowledge import KnowledgeGraph, Retrieval, retrieve
from clinragen_fhir.knowledge.masking import ROOTS, occurrences
from clinragen_fhir.knowledge.retrieval import find_mentions, supporting_tests
from clinragen_fhir.predict.diagnosis_line import format_target
from training.example import Example
from training.llm import LLMClient
from training.prompts import (
    STAGES,
    diagnoses_text,
    lab_phrase,
    render_facts,
    render_labs,
    render_notes,
    stage_messages,
)

KNOWLEDGE_TEACHER = "knowledge-grounded-v1"
MAX_CITED = 3  # readings cited per finding (first and latest ones)
MAX_OTHER_ABNORMAL = 4


@dataclass
class TeacherOutput:
    """One example's rationales (accepted stages only) and why any stage was rejected."""

    rationales: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


class Teacher(Protocol):
    name: str

    def annotate(self, examples: Sequence[Example]) -> list[TeacherOutput]: ...


# ---------------------------------------------------------------------------------------------
# labels: order, specificity, agreement


def most_specific(kg: KnowledgeGraph, labels: Collection[str]) -> list[str]:
    """Labels that are not an IS-A ancestor of another label (what a rationale must address)."""
    implied: set[str] = set()
    for code in labels:
        implied |= kg.ancestors(code)
    return sorted(c for c in labels if c not in implied)


def ordered_diagnoses(kg: KnowledgeGraph, labels: Collection[str]) -> list[tuple[str, str]]:
    """(code, term) for the diagnosis line: most specific first (deepest), then by code."""
    def key(code: str) -> tuple[int, str]:
        return (-len(kg.ancestors(code)), code)

    out = []
    for code in sorted(labels, key=key):
        dis = kg.disorder(code)
        out.append((code, dis.term if dis else code))
    return out


MAX_CITED_PER_DIAGNOSIS = 2


def _related(kg: KnowledgeGraph, code: str) -> set[str]:
    return {code} | kg.ancestors(code) | kg.descendants(code)


def _term(kg: KnowledgeGraph, code: str) -> str:
    dis = kg.disorder(code)
    return dis.term if dis else code


def check_agreement(kg: KnowledgeGraph, text: str, labels: Collection[str],
                    prior: Collection[str] = ()) -> tuple[bool, str]:
    """A rationale agrees with the labels when it names every most-specific label (or a
    narrower term of it) and asserts no other disorder (known prior problems excepted).

    Negated mentions ("no lab evidence for anemia") count as naming a label, and never as
    asserting another disorder."""
    named: set[str] = set()
    for _, _, codes in occurrences(kg, text):
        named |= codes
    missing = [c for c in most_specific(kg, labels)
               if not ({c} | kg.descendants(c)) & named]
    if missing:
        return False, "does not address " + ", ".join(_term(kg, c) for c in missing)
    # a narrower term of a most-specific label is fine; groupings and known problems admit
    # themselves and their ancestors only ("metabolic disease" known must not admit gout)
    allowed = set(ROOTS)
    for code in most_specific(kg, labels):
        allowed |= _related(kg, code)
    for code in [*labels, *prior]:
        allowed |= {code} | kg.ancestors(code)
    note = Note("rationale", "", None, text)
    asserted = sorted({m.code for m in find_mentions(kg, [note])
                       if m.kind == "disorder" and not m.negated and m.code not in allowed})
    if asserted:
        return False, "asserts unrecorded " + ", ".join(_term(kg, c) for c in asserted)
    return True, ""


# ---------------------------------------------------------------------------------------------
# the knowledge-grounded teacher


def _day(ts: object) -> str:
    return pd.Timestamp(ts).strftime("%Y-%m-%d")  # type: ignore[arg-type]


class KnowledgeTeacher:
    """Rationales from the graph retrieval and the example's own values; deterministic."""

    name = KNOWLEDGE_TEACHER

    def __init__(self, kg: KnowledgeGraph, readings_first: bool = False,
                 cite_top: int = 10) -> None:
        self.kg = kg
        # visit rationales cite only readings among the first `cite_top` the prompt's lab text
        # shows (`reading_texts` order): what the student can see, it can learn to copy
        self.cite_top = cite_top
        # Open the labs and multimodal rationales with the patient's abnormal latest readings:
        # a truncated target (max_target_tokens) then still carries values a student can learn
        # to cite. Off by default: the shipped model's data were annotated without it.
        self.readings_first = readings_first

    def annotate(self, examples: Sequence[Example]) -> list[TeacherOutput]:
        return [TeacherOutput(self.rationales(ex)) for ex in examples]

    def rationales(self, ex: Example) -> dict[str, str]:
        r = retrieve(self.kg, ex.labs, ex.notes, ex.patient)
        if ex.meta.get("index_kind") == "visit":
            return self.visit_rationales(ex, r)
        targets = most_specific(self.kg, ex.labels)
        prior = [str(c) for c in ex.meta.get("prior_disorders", [])]
        notes = self.notes_rationale(ex, r, targets, prior)
        labs = self.labs_rationale(ex, r, targets)
        multi = self.multimodal_rationale(ex, r, targets, prior)
        return {"notes": notes, "labs": labs, "multimodal": multi,
                "diagnosis": format_target(multi, ordered_diagnoses(self.kg, ex.labels))}

    # -- the visit question (training.data.visit_examples) ----------------------------------
    def visit_rationales(self, ex: Example, r: Retrieval) -> dict[str, str]:
        """Short targets a small student can learn: stage 1 what the notes hold, stage 2 the
        abnormal readings, stages 3-4 one line per diagnosis naming the readings behind it,
        written exactly as the prompt shows them (`reading_texts`), so citing is copying."""
        readings = reading_texts(ex.labs, r.lab_names)
        notes = self.notes_rationale(ex, r, [], [])
        abnormal = [t for _, t in readings if t.endswith((", high", ", low"))][:MAX_OTHER_ABNORMAL]
        labs = ("Abnormal latest results: " + "; ".join(abnormal) + "." if abnormal else
                "The latest results are within their reference ranges." if readings else
                "No lab results.")
        lines = []
        for code, _ in ordered_diagnoses(self.kg, most_specific(self.kg, ex.labels)):
            tests = supporting_tests(self.kg, code)
            cited = [t for loinc, t in readings[:self.cite_top]
                     if loinc in tests][:MAX_CITED_PER_DIAGNOSIS]
            lines.append(f"{_term(self.kg, code)}: " + ("; ".join(cited) if cited else
                                                       "no supporting reading") + ".")
        per_diagnosis = "\n".join(lines) or "No disorder is supported by these results."
        return {"notes": notes, "labs": labs, "multimodal": per_diagnosis,
                "diagnosis": per_diagnosis}

    # -- pieces -----------------------------------------------------------------------------
    def _index_day(self, ex: Example) -> str:
        return _day(ex.patient.index_time) if ex.patient.index_time else "the index time"

    def _row(self, ex: Example, observation_id: str, loinc: str) -> pd.Series | None:
        rows = ex.labs[(ex.labs["observation_id"] == observation_id)
                       & (ex.labs["loinc"] == loinc)]
        return rows.iloc[0] if not rows.empty else None

    def _lab_evidence(self, ex: Example, r: Retrieval, code: str) -> tuple[list[str], list[str]]:
        """Sentences for and against one label from the findings (each citing real readings)."""
        related = _related(self.kg, code)
        pro: list[str] = []
        con: list[str] = []
        by_id = {f.id: f for f in r.findings}
        for d in r.disorders:
            if d.snomed not in related:
                continue
            for refs, bucket in ((d.supporting, pro), (d.opposing, con)):
                for ref in refs:
                    hit = by_id.get(ref.evidence)
                    if hit is None:
                        continue  # a note mention, handled with the notes
                    rows = list(hit.rows)
                    cited = rows if len(rows) <= MAX_CITED else [rows[0], *rows[-2:]]
                    phrases = []
                    for tr in cited:
                        row = self._row(ex, tr.observation_id, tr.loinc)
                        if row is not None:
                            phrases.append(lab_phrase(self.kg, row))
                    if not phrases:
                        continue
                    verb = "supports" if bucket is pro else "argues against"
                    target = "" if d.snomed == code else f" ({d.term})"
                    bucket.append(f"{hit.label}: {'; '.join(phrases)}. This {verb} "
                                  f"{_term(self.kg, code)}{target} ({ref.source}).")
        return list(dict.fromkeys(pro)), list(dict.fromkeys(con))

    def _other_abnormal(self, ex: Example, cited: str) -> list[str]:
        if ex.labs.empty:
            return []
        latest = ex.labs.sort_values("time", kind="stable").groupby("loinc").tail(1)
        out = []
        for _, row in latest.iterrows():
            phrase = lab_phrase(self.kg, row)
            if (", high" in phrase or ", low" in phrase) and phrase not in cited:
                out.append(phrase)
        return out[:MAX_OTHER_ABNORMAL]

    def _key_results(self, ex: Example, n: int = 2) -> list[str]:
        """["Abnormal latest results: a; b."] or [] when every latest reading is in range."""
        other = self._other_abnormal(ex, "")[:n]
        return ["Abnormal latest results: " + "; ".join(other) + "."] if other else []

    def notes_rationale(self, ex: Example, r: Retrieval, targets: Sequence[str],
                        prior: Sequence[str]) -> str:
        day = self._index_day(ex)
        if not ex.notes:
            parts = [f"No clinical notes before {day}."]
        else:
            dated = [n.time for n in ex.notes if n.time is not None]
            span = f" from {_day(min(dated))} to {_day(max(dated))}" if dated else ""
            parts = [f"{len(ex.notes)} notes{span}."]
            when = {n.document_id: _day(n.time) if n.time else "undated" for n in ex.notes}
            known = set(prior)
            seen: set[tuple[str, bool]] = set()
            said: list[str] = []
            for m in r.note_mentions:
                if m.kind == "disorder" and m.code not in known:
                    continue  # only known problems are named in notes (others are masked)
                if (m.code, m.negated) in seen:
                    continue
                seen.add((m.code, m.negated))
                what = f"known {m.term}" if m.kind == "disorder" else m.term
                said.append(f"{'no ' if m.negated else ''}{what} (note of {when[m.document_id]})")
            if said:
                parts.append("The notes mention " + ", ".join(said[:6]) + ".")
        for code in targets:
            parts.append(f"The notes do not name {_term(self.kg, code)}: no note evidence "
                         f"for it.")
        if not targets:
            parts.append("Nothing in the notes points to a new disorder.")
        return " ".join(parts)

    def labs_rationale(self, ex: Example, r: Retrieval, targets: Sequence[str]) -> str:
        day = self._index_day(ex)
        if ex.labs.empty:
            parts = [f"No lab results before {day}."]
            parts += [f"No lab evidence for {_term(self.kg, c)}." for c in targets]
            return " ".join(parts)
        n_tests = ex.labs["loinc"].nunique()
        parts = [f"{len(ex.labs)} results of {n_tests} tests from {_day(ex.labs['time'].min())} "
                 f"to {_day(ex.labs['time'].max())}."]
        if self.readings_first:
            parts = self._key_results(ex)[:1] + parts
        for code in targets:
            pro, con = self._lab_evidence(ex, r, code)
            parts += pro + con
            if not pro:
                parts.append(f"No lab evidence for {_term(self.kg, code)}.")
        other = self._other_abnormal(ex, " ".join(parts))
        if other:
            parts.append("Other abnormal latest results: " + "; ".join(other) + ".")
        if not targets:
            parts.append("No lab result points to a new disorder.")
        return " ".join(parts)

    def multimodal_rationale(self, ex: Example, r: Retrieval, targets: Sequence[str],
                             prior: Sequence[str]) -> str:
        day = self._index_day(ex)
        parts = self._key_results(ex) if self.readings_first else []
        known = [_term(self.kg, c) for c in most_specific(self.kg, prior)]
        if known:
            parts.append("Known before " + day + ": " + ", ".join(known) + ".")
        for code in targets:
            pro, con = self._lab_evidence(ex, r, code)
            term = _term(self.kg, code)
            if pro:
                parts.append(f"{term} is supported by the labs. " + " ".join(pro + con))
            else:
                parts.append(f"{term}: no lab or note evidence before {day}; it was recorded "
                             "later without support in these inputs." + (
                                 " " + " ".join(con) if con else ""))
        if not targets:
            parts.append(f"No new disorder is supported by the labs, notes or knowledge "
                         f"before {day}.")
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# the LLM teacher


class LLMTeacher:
    """Per-stage prompts to a chat endpoint; answers that disagree with the labels are dropped."""

    def __init__(self, client: LLMClient, kg: KnowledgeGraph) -> None:
        self.client = client
        self.kg = kg
        self.name = client.config.model
        self.rejections: Counter[str] = Counter()  # stage -> rejected answers
        self.accepted: Counter[str] = Counter()

    def _fields(self, ex: Example) -> dict[str, str]:
        r = retrieve(self.kg, ex.labs, ex.notes, ex.patient)
        prior = [str(c) for c in ex.meta.get("prior_disorders", [])]
        return {"notes": render_notes(ex.notes), "labs": render_labs(self.kg, ex.labs),
                "facts": render_facts(r),
                "prior": ", ".join(_term(self.kg, c) for c in most_specific(self.kg, prior))
                or "none",
                "diagnoses": diagnoses_text(self.kg, most_specific(self.kg, ex.labels))}

    def _judge(self, ex: Example, stage: str, text: str, out: TeacherOutput) -> None:
        ok, reason = check_agreement(self.kg, text, ex.labels,
                                     [str(c) for c in ex.meta.get("prior_disorders", [])])
        if ok and text.strip():
            out.rationales[stage] = text.strip()
            self.accepted[stage] += 1
        else:
            out.rejected[stage] = reason or "empty answer"
            self.rejections[stage] += 1

    def annotate(self, examples: Sequence[Example]) -> list[TeacherOutput]:
        fields = [self._fields(ex) for ex in examples]
        outs = [TeacherOutput() for _ in examples]
        first = [s for s in STAGES if s != "diagnosis"]
        asks = [(i, s) for i in range(len(examples)) for s in first]
        answers = self.client.complete_many([stage_messages(s, **fields[i]) for i, s in asks])
        for (i, s), a in zip(asks, answers, strict=True):
            self._judge(examples[i], s, a.text, outs[i])
        # the diagnosis stage builds on an accepted multimodal rationale
        ready = [i for i, o in enumerate(outs) if "multimodal" in o.rationales]
        for i, o in enumerate(outs):
            if i not in ready:
                o.rejected["diagnosis"] = "no accepted multimodal rationale"
                self.rejections["diagnosis"] += 1
        answers = self.client.complete_many([stage_messages(
            "diagnosis", rationale=outs[i].rationales["multimodal"],
            diagnoses=fields[i]["diagnoses"]) for i in ready])
        for i, a in zip(ready, answers, strict=True):
            self._judge(examples[i], "diagnosis", a.text, outs[i])
            if "diagnosis" in outs[i].rationales:
                outs[i].rationales["diagnosis"] = format_target(
                    outs[i].rationales["diagnosis"], ordered_diagnoses(self.kg, examples[i].labels))
        return outs
