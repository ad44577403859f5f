"""Teachers: the LLM client against a local OpenAI-style server, and the knowledge-grounded
teacher on real records (cites only values of the patient's own frame)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.predict.diagnosis_line import split_output
from training.annotate import annotate_dataset
from training.data import BuildConfig, build_dataset, load_split, read_dataset_manifest
from training.example import Example
from training.llm import LLMClient, LLMConfig, LLMError, cache_key
from training.prompts import fmt_value
from training.teacher import (
    KNOWLEDGE_TEACHER,
    KnowledgeTeacher,
    LLMTeacher,
    check_agreement,
    most_specific,
)

Reply = tuple[int, dict[str, str], dict[str, Any]]


@dataclass
class FakeServer:
    """What the fake /v1/chat/completions endpoint saw."""

    url: str
    respond: Callable[[dict[str, Any], int], Reply]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def ok(text: str, prompt: int = 11, completion: int = 7) -> Reply:
    return 200, {}, {"choices": [{"message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer("", lambda body, n: ok("fine"))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.starts.append(time.monotonic())
                state.bodies.append(body)
                state.auth.append(self.headers.get("Authorization"))
                n = len(state.bodies)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            time.sleep(state.delay)
            status, headers, payload = (state.respond(body, n) if self.path ==
                                        "/v1/chat/completions" else (404, {}, {}))
            with state.lock:
                state.in_flight -= 1
            data = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def client(server: FakeServer, tmp_path: Path | None = None, **kw: Any) -> LLMClient:
    cfg = LLMConfig(base_url=server.url, model="teacher-x", api_key_env="CRG_TEST_KEY",
                    backoff_s=0.01, rate_per_s=0, cache_dir=tmp_path, **kw)
    return LLMClient(cfg)


MSG = [{"role": "user", "content": "hello"}]


def test_cache_makes_the_second_call_free_and_tokens_are_counted(
        server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRG_TEST_KEY", "s3cret-key")
    with client(server, tmp_path) as c:
        a = c.complete(MSG)
        b = c.complete(MSG)
        c.complete(MSG, temperature=0.7)  # other parameters: another entry
    assert (a.text, a.cached, b.cached) == ("fine", False, True)
    assert len(server.bodies) == 2
    assert server.bodies[0]["model"] == "teacher-x" and server.bodies[0]["temperature"] == 0.0
    assert server.auth[0] == "Bearer s3cret-key"
    assert c.stats.as_dict() == {"requests": 2, "completions": 3, "cache_hits": 1,
                                 "retries": 0, "prompt_tokens": 22, "completion_tokens": 14}
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 2
    assert all("s3cret" not in f.read_text() for f in files)
    key = cache_key("teacher-x", MSG, {"temperature": 0.0, "max_tokens": 400})
    assert (tmp_path / key[:2] / f"{key}.json").exists()


def test_no_key_no_auth_header(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRG_TEST_KEY", raising=False)
    with client(server) as c:
        c.complete(MSG)
    assert server.auth == [None]


def test_retry_honours_retry_after_on_429_and_5xx(server: FakeServer) -> None:
    def respond(body: dict[str, Any], n: int) -> Reply:
        if n == 1:
            return 429, {"Retry-After": "1"}, {"error": "slow down"}
        if n == 2:
            return 503, {}, {"error": "busy"}
        return ok("after retries")

    server.respond = respond
    started = time.monotonic()
    with client(server) as c:
        out = c.complete(MSG)
    assert out.text == "after retries"
    assert len(server.bodies) == 3 and c.stats.retries == 2
    assert server.starts[1] - server.starts[0] >= 0.95  # waited as told, not the 10 ms backoff
    assert time.monotonic() - started < 5


def test_gives_up_after_bounded_retries_and_on_client_errors(server: FakeServer) -> None:
    server.respond = lambda body, n: (500, {}, {"error": "down"})
    with client(server, retries=2) as c, pytest.raises(LLMError, match="after 3 tries"):
        c.complete(MSG)
    assert len(server.bodies) == 3
    server.respond = lambda body, n: (400, {}, {"error": "bad request"})
    with client(server) as c, pytest.raises(LLMError, match="HTTP 400"):
        c.complete(MSG)
    assert len(server.bodies) == 4  # a 400 is not retried


def test_concurrency_and_rate_limits_hold(server: FakeServer) -> None:
    server.delay = 0.15
    batch = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    with client(server, concurrency=2) as c:
        answers = c.complete_many(batch)
    assert [a.text for a in answers] == ["fine"] * 8
    # Never more than the limit at once (a loaded machine may not reach it: no lower bound).
    assert 1 <= server.max_in_flight <= 2
    server.bodies.clear()
    server.starts.clear()
    server.delay, server.max_in_flight = 0.0, 0
    cfg = LLMConfig(base_url=server.url, model="m", rate_per_s=10, concurrency=8)
    with LLMClient(cfg) as c:
        c.complete_many(batch)
    gaps = [b - a for a, b in zip(sorted(server.starts), sorted(server.starts)[1:], strict=False)]
    assert len(server.starts) == 8
    # 10 per second even with 8 workers: 8 starts span >= 0.7 s. Arrival times at the server
    # jitter under load, so single gaps are only checked loosely (a burst would show ~0 s gaps).
    assert sorted(server.starts)[-1] - sorted(server.starts)[0] >= 0.65
    assert sorted(gaps)[len(gaps) // 2] >= 0.08


# ---------------------------------------------------------------------------------------------
# teachers on real records


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


@pytest.fixture(scope="module")
def small_dataset(kg: KnowledgeGraph, data_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    build_dataset([data_dir / "new_york"], out, kg=kg, progress=False,
                  config=BuildConfig(seed=2, max_patients=14, mode="onset"))
    return out


@pytest.fixture(scope="module")
def visit_dataset(kg: KnowledgeGraph, data_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("visits")
    build_dataset([data_dir / "new_york"], out, kg=kg, progress=False,
                  config=BuildConfig(seed=2, max_patients=14))
    return out


def test_visit_rationales_cite_the_shown_readings_per_diagnosis(kg: KnowledgeGraph,
                                                                visit_dataset: Path) -> None:
    """One line per most specific label, each citing readings exactly as the prompt shows them
    (copyable) and only readings of tests whose findings support that disorder."""
    from clinragen_fhir.encoding.features import reading_texts
    from clinragen_fhir.inference.grounding import NO_SUPPORT, NOTHING
    from clinragen_fhir.knowledge import retrieve
    from clinragen_fhir.knowledge.retrieval import supporting_tests
    from clinragen_fhir.report.faithfulness import LabLexicon, diagnosis_claims
    from training.teacher import ordered_diagnoses

    teacher = KnowledgeTeacher(kg)
    examples = all_examples(visit_dataset)
    lexicon = LabLexicon.build(kg, [e.labs for e in examples])
    cited = lines = 0
    for ex in examples:
        out = teacher.rationales(ex)
        terms = [t for _, t in ordered_diagnoses(kg, most_specific(kg, ex.labels))]
        if not terms:
            assert out["diagnosis"] == NOTHING
            continue
        names = retrieve(kg, ex.labs, ex.notes, ex.patient).lab_names
        shown = dict((t, c) for c, t in reading_texts(ex.labs, names)[:teacher.cite_top])
        text = out["diagnosis"]
        assert [ln.split(":")[0] for ln in text.split("\n")] == terms
        for (code, _), dc in zip(ordered_diagnoses(kg, most_specific(kg, ex.labels)),
                                 diagnosis_claims(text, terms, ex.labs, lexicon), strict=True):
            lines += 1
            clauses = dc.line.split(": ", 1)[1].rstrip(".").split("; ")
            for c in clauses:
                assert c == NO_SUPPORT or shown[c] in supporting_tests(kg, code), dc.line
            assert all(x.matched for x in dc.checks), dc.line
            cited += dc.cited
    assert lines > 20 and cited > lines / 2


def all_examples(folder: Path) -> list[Example]:
    return [e for s in ("train", "valid", "test") for e in load_split(folder, s)]


LAB_CLAIM = re.compile(r"(?P<value>-?\d+(?:\.\d+)?) (?P<unit>\S+) on (?P<day>\d{4}-\d{2}-\d{2})")


@pytest.mark.parametrize("readings_first", [False, True])
def test_knowledge_teacher_cites_only_the_patients_values(kg: KnowledgeGraph,
                                                          small_dataset: Path,
                                                          readings_first: bool) -> None:
    teacher = KnowledgeTeacher(kg, readings_first=readings_first)
    examples = all_examples(small_dataset)
    assert len(examples) > 20
    cited = 0
    for ex in examples:
        out = teacher.rationales(ex)
        assert set(out) == {"notes", "labs", "multimodal", "diagnosis"}
        assert out == teacher.rationales(ex)  # deterministic
        days = pd.to_datetime(ex.labs["time"], utc=True).dt.strftime("%Y-%m-%d") \
            if not ex.labs.empty else pd.Series([], dtype=str)
        readings = {(fmt_value(v), u, d) for v, u, d in
                    zip(ex.labs["value"], ex.labs["unit"], days, strict=True)}
        for stage, text in out.items():
            for m in LAB_CLAIM.finditer(text):
                cited += 1
                assert (m["value"], m["unit"].rstrip(",;."), m["day"]) in readings, \
                    (stage, m.group(0))
            ok, why = check_agreement(kg, text, ex.labels, ex.meta["prior_disorders"])
            assert ok, (stage, why, text)
        rationale, codes = split_output(out["diagnosis"])
        assert sorted(codes) == sorted(ex.labels) and rationale == out["multimodal"]
        for code in most_specific(kg, ex.labels):
            term = kg.disorder(code).term  # type: ignore[union-attr]
            if ex.labs.empty:
                assert f"No lab evidence for {term}" in out["labs"]
    assert cited > 50  # the check above ran on real citations


def test_readings_first_opens_with_abnormal_values_and_adds_nothing_else(
        kg: KnowledgeGraph, small_dataset: Path) -> None:
    plain, first = KnowledgeTeacher(kg), KnowledgeTeacher(kg, readings_first=True)
    opened = 0
    for ex in all_examples(small_dataset):
        a, b = plain.rationales(ex), first.rationales(ex)
        assert a["notes"] == b["notes"]  # notes stage is about notes only
        if b["multimodal"].startswith("Abnormal latest results: "):
            opened += 1
            head, _, rest = b["multimodal"].partition(". ")
            assert LAB_CLAIM.search(head) and rest == a["multimodal"]
            assert ", high" in head or ", low" in head
        else:
            assert b == a  # nothing abnormal: the same rationale
    assert opened > 5


def test_agreement_check(kg: KnowledgeGraph) -> None:
    labels = ["44054006", "73211009"]  # type 2 diabetes and its parent
    assert check_agreement(kg, "HbA1c 7.1 % supports type 2 diabetes mellitus.", labels)[0]
    assert check_agreement(kg, "No lab evidence for T2DM.", labels)[0]
    ok, why = check_agreement(kg, "Findings fit anemia.", labels)
    assert not ok and "does not address Diabetes mellitus type 2" in why
    ok, why = check_agreement(kg, "Type 2 diabetes mellitus and gout.", labels)
    assert not ok and "asserts unrecorded Gout" in why
    assert check_agreement(kg, "Type 2 diabetes mellitus; no gout.", labels)[0]
    assert check_agreement(kg, "T2DM on top of known gout.", labels, ["90560007"])[0]


def test_llm_teacher_rejects_disagreeing_answers_and_annotates(
        kg: KnowledgeGraph, server: FakeServer, small_dataset: Path, tmp_path: Path) -> None:
    examples = [e for e in all_examples(small_dataset) if e.labels]

    def respond(body: dict[str, Any], n: int) -> Reply:
        prompt = body["messages"][-1]["content"]
        wanted = re.search(r"Recorded diagnoses: (.*)", prompt)
        terms = wanted.group(1) if wanted else ""
        if "from the notes only" in prompt:
            return ok("The notes describe gout.")  # not recorded: rejected
        return ok(f"The data are consistent with {terms}.", prompt=100, completion=20)

    server.respond = respond
    with client(server, tmp_path / "cache", concurrency=3) as c:
        teacher = LLMTeacher(c, kg)
        outs = teacher.annotate(examples[:4])
        for o in outs:
            assert set(o.rationales) == {"labs", "multimodal", "diagnosis"}
            assert o.rejected["notes"].startswith(("asserts unrecorded Gout", "does not address"))
            assert "\nDiagnosis: " in o.rationales["diagnosis"]
        assert teacher.rejections["notes"] == 4 and teacher.accepted["multimodal"] == 4
        assert len(server.bodies) == 16  # 4 stages x 4 examples
        # annotate a whole (copied) dataset: rationales and meta written, cache reused
        report = annotate_dataset(small_dataset, teacher, tmp_path / "out", progress=False)
    n = len(all_examples(small_dataset))
    assert report.examples == n and report.teacher == "teacher-x"
    assert report.rejected["notes"] == n
    assert report.usage["cache_hits"] >= 16 and report.usage["prompt_tokens"] > 0
    written = all_examples(tmp_path / "out")
    assert all(e.meta["teacher"] == "teacher-x" and "notes" not in e.rationales
               for e in written)
    assert read_dataset_manifest(tmp_path / "out").seed == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["teacher"]["rejected"]


def test_annotate_in_place_with_the_knowledge_teacher_cli(small_dataset: Path,
                                                          tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from training.data_cli import annotate

    folder = tmp_path / "ds"
    shutil.copytree(small_dataset, folder)
    result = CliRunner().invoke(annotate, ["--data", str(folder), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    examples = all_examples(folder)
    assert report["examples"] == len(examples) and report["teacher"] == KNOWLEDGE_TEACHER
    assert all(set(e.rationales) == {"notes", "labs", "multimodal", "diagnosis"}
               and e.meta["teacher"] == KNOWLEDGE_TEACHER for e in examples)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["teacher"]["stages"]["diagnosis"] == len(examples)
    bad = CliRunner().invoke(annotate, ["--data", str(folder), "--teacher", "llm"])
    assert bad.exit_code == 2 and "--llm-url" in bad.output
