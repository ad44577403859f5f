"""Broker TLS and Redis AUTH (issue 13, item 9).

* `rediss://` made kombu connect with CERT_NONE (and a rediss:// result backend was refused by
  Celery for want of `ssl_cert_reqs`); `amqps://` verified the certificate but not the host
  name. Either way anyone on the path could pose as the broker: read the tasks (patient ids) and
  queue their own. Now the computed Celery config asks for CERT_REQUIRED and the host name, and
  the options are checked down to the objects the installed redis-py and py-amqp build.
* The shipped compose and k8s configs ran Redis without a password. Now Redis requires one, every
  Redis URL carries it, and the example placeholder is refused like the other secrets. (The raw
  k8s manifest is gone: the Helm chart reads the Redis URLs from the site's own Secret,
  tests/unit/test_deploy_static.py.)
"""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from amqp.transport import SSLTransport
from kombu import Connection

from clinragen_fhir.config import Settings
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.site_secrets import is_placeholder
from clinragen_fhir.worker.app import broker_tls, make_app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REDISS = "rediss://:s3cret-pw@redis.example.org:6380/0"
AMQPS = "amqps://u:p@mq.example.org:5671/clinragen"


def test_kombu_alone_does_not_check_what_it_connects_to() -> None:
    """What the defaults were: the reason for the fix."""
    assert Connection(REDISS).ssl == {"ssl_cert_reqs": ssl.CERT_NONE}
    plain = SSLTransport.__new__(SSLTransport)._wrap_socket_sni(socket.socket())
    assert not plain.context.check_hostname  # amqps:// with ssl=True: any name is accepted
    plain.close()


def test_rediss_broker_and_backend_require_a_verified_certificate_and_host_name(
        tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    app = make_app(Settings(broker_url=REDISS, result_backend=REDISS.replace("/0", "/1"),
                            broker_ca_file=ca))
    tls = app.conf.broker_use_ssl
    assert tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True,
                   "ssl_ca_certs": str(ca)}
    assert app.connection_for_write().ssl == tls  # what kombu's redis transport passes on
    # kombu hands these keywords to redis-py's SSLConnection, unchanged
    conn = redis.SSLConnection(host="redis.example.org", **tls)
    assert conn.cert_reqs == ssl.CERT_REQUIRED and conn.check_hostname
    assert conn.ca_certs == str(ca)
    # the result backend (Celery's RedisBackend) builds its connections from the same options
    backend = app.backend.client.connection_pool.make_connection()
    assert isinstance(backend, redis.SSLConnection)
    assert backend.cert_reqs == ssl.CERT_REQUIRED and backend.check_hostname
    assert backend.host == "redis.example.org"


def test_amqps_broker_checks_the_host_name() -> None:
    app = make_app(Settings(broker_url=AMQPS))
    tls = app.conf.broker_use_ssl
    assert tls == {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": None,
                   "server_hostname": "mq.example.org"}
    assert app.connection_for_write().ssl == tls
    assert app.conf.broker_transport_options == {"confirm_publish": True}  # unchanged
    # py-amqp wraps the socket with these options: the context checks name and certificate
    wrapped = SSLTransport.__new__(SSLTransport)._wrap_socket_sni(socket.socket(), **tls)
    try:
        assert wrapped.context.check_hostname and wrapped.server_hostname == "mq.example.org"
        assert wrapped.context.verify_mode == ssl.CERT_REQUIRED
    finally:
        wrapped.close()


def test_plain_urls_get_no_tls_options_and_failover_lists_leave_the_name_to_kombu() -> None:
    app = make_app(Settings())
    assert not app.conf.broker_use_ssl and not app.conf.redis_backend_use_ssl
    assert broker_tls("amqp://guest@localhost//") is None
    failover = broker_tls("amqps://a.example.org//;amqps://b.example.org//")
    assert failover is not None and failover["server_hostname"] is None  # kombu sets each host


def test_the_state_store_url_verifies_too() -> None:
    """state_url goes to redis-py's from_url, whose rediss:// defaults already verify."""
    conn = redis.Redis.from_url("rediss://:pw@redis.example.org:6380/4") \
        .connection_pool.make_connection()
    assert conn.cert_reqs == ssl.CERT_REQUIRED and conn.check_hostname


# -- Redis AUTH in the shipped configs --------------------------------------------------------
def compose_env() -> dict[str, str]:
    """deploy/compose/.env, which docker compose reads for its ${...} interpolation."""
    return dict(line.split("=", 1) for line in (DEPLOY / "compose" / ".env").read_text()
                .splitlines() if line.strip() and not line.startswith("#"))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME:?message}`: the variable's value, or an error when it is unset."""
    def one(m: re.Match[str]) -> str:
        if m.group(1) not in env:
            raise KeyError(m.group(1))
        return env[m.group(1)]

    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", one, value)


def redis_urls(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in (
        "CLINRAGEN_BROKER_URL", "CLINRAGEN_RESULT_BACKEND", "CLINRAGEN_STATE_URL")}


def test_compose_redis_requires_the_password_every_url_carries() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    env = compose_env()
    password = env["CLINRAGEN_REDIS_PASSWORD"]
    services = compose["services"]
    command = [interpolate(a, env) for a in services["redis"]["command"]]
    assert command[command.index("--requirepass") + 1] == password
    assert interpolate(services["redis"]["environment"]["REDISCLI_AUTH"], env) == password
    for name, svc in services.items():
        if name in ("hapi", "redis"):
            continue
        urls = redis_urls(svc["environment"])
        assert len(urls) == 3, name
        for key, url in urls.items():
            assert urlsplit(interpolate(url, env)).password == password, (name, key)
            with pytest.raises(KeyError):  # unset: compose stops (`:?`), no passwordless start
                interpolate(url, {})


def test_the_shipped_redis_password_placeholders_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLINRAGEN_LOG_ID_KEY", raising=False)
    env = compose_env()
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    assert is_placeholder(env["CLINRAGEN_REDIS_PASSWORD"])
    shipped = [interpolate(u, env) for u in redis_urls(compose["x-app"]["environment"]).values()]
    fields = {"redis:6379/0": "broker_url", "redis:6379/1": "result_backend",
              "redis:6379/4": "state_url"}
    for url in shipped:
        field = fields[url.rsplit("@", 1)[1]]
        with pytest.raises(FhirConfigError, match=f"password in {field} is the example"):
            Settings(**{field: url}).check_site_secrets()
    monkeypatch.setenv("CLINRAGEN_LOG_ID_KEY", "a-real-site-key-0123456789abcdef")
    Settings(broker_url="redis://:Zq81-real-password@redis:6379/0").check_site_secrets()
