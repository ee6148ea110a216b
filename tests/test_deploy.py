"""The deployment kit: Kubernetes and Compose files against their schemas, their configs
through --check-config, the alert rules through promtool, and every metric and label the
dashboard and the rules name against a running gateway's /metrics.

Each check is also run on a broken copy of its file in tmp_path, to show that it fails.
The external tools run once (these tests are not async), except the scrape.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import ClientSession
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError

import gateway
from gateway.runtime import reload_config
from tests.conftest import GatewayFactory
from tests.opskit import REPO, Exported, documented_metric_problems, exported_from_text, metric_problems
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.support import BILLING_KEY, REPORTING_KEY, make_config, scrape_metrics
from tests.upstream import Upstream, batch_body, json_handler

KUBERNETES = REPO / "deploy" / "kubernetes"
COMPOSE = REPO / "deploy" / "compose.yaml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "cohere-gateway.json"
TOOL_TIMEOUT_S = 120


def tool(name: str) -> str:
    """A command-line tool from the test environment (beside this Python), else from PATH."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def promtool() -> str:
    """Debian's promtool; `make test` installs it. Without it these tests skip, unless CI asks for it."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("GATEWAY_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is not installed: apt-get install prometheus (make promtool)")
        pytest.skip("promtool is not installed: apt-get install prometheus (make promtool)")
    return found


def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (the repository's own tools and files)
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
        env={**os.environ, **(env or {})},
    )


def check_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "gateway", "--config", path, "--check-config", env=env)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def broken_copy(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    """``source`` copied into tmp_path with one occurrence of ``old`` replaced by ``new``."""
    text = source.read_text(encoding="utf-8")
    assert old in text, f"{old!r} is not in {source.name}"
    target = tmp_path / source.name
    target.write_text(text.replace(old, new, 1), encoding="utf-8")
    return target


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("kubernetes-validate"), "--strict", "--quiet", *paths)


def test_the_kubernetes_manifests_pass_the_kubernetes_schemas() -> None:
    done = kubernetes_validate(*sorted(KUBERNETES.glob("*.yaml")))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("replicas: 2", "replicas: two"),  # a wrong type
        ("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true"),  # a misspelt field (--strict)
    ],
)
def test_a_broken_manifest_fails_the_kubernetes_schemas(tmp_path: Path, old: str, new: str) -> None:
    done = kubernetes_validate(broken_copy(tmp_path, KUBERNETES / "deployment.yaml", old, new))
    assert done.returncode != 0


def kubernetes_objects(folder: Path = KUBERNETES) -> dict[tuple[str, str], dict[str, Any]]:
    """Every object in the folder's manifests, by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for path in sorted(folder.glob("*.yaml")) for d in documents(path)}


def configmap_config(configmap: Path, tmp_path: Path) -> Path:
    [document] = documents(configmap)
    path = tmp_path / "config.yaml"
    path.write_text(document["data"]["config.yaml"], encoding="utf-8")
    return path


GATEWAY = ("Deployment", "cohere-gateway")
REDIS = ("StatefulSet", "cohere-gateway-redis")
REDIS_PASSWORD_REF = {"name": "cohere-gateway-redis", "key": "password"}
REDIS_TEST_PASSWORD = "redis-password-for-the-check-6e0b"


def only_container(objects: dict[tuple[str, str], dict[str, Any]], which: tuple[str, str]) -> dict[str, Any]:
    [container] = objects[which]["spec"]["template"]["spec"]["containers"]
    return container


def redis_url_in_the_pods(objects: dict[tuple[str, str], dict[str, Any]], password: str) -> str:
    """The gateway pods' $REDIS_URL, as Kubernetes expands it with ``password`` in the Secret."""
    env = {e["name"]: e for e in only_container(objects, GATEWAY)["env"]}
    return str(env["REDIS_URL"]["value"]).replace("$(REDIS_PASSWORD)", password)


def configmap_env(tmp_path: Path, caller_key: str = "a-caller-key-for-the-check-5f1e") -> dict[str, str]:
    """What the gateway pods give the ConfigMap's config: the token file, a caller's key file, $REDIS_URL."""
    token = tmp_path / "token"
    token.write_text("a-token-for-the-check\n", encoding="utf-8")
    key = tmp_path / "example-service-key"
    key.write_text(caller_key, encoding="utf-8")
    return {
        "COHERE_TOKEN_FILE": str(token),
        "EXAMPLE_SERVICE_KEY_FILE": str(key),
        "REDIS_URL": redis_url_in_the_pods(kubernetes_objects(), REDIS_TEST_PASSWORD),
    }


def test_the_configmaps_config_passes_check_config(tmp_path: Path) -> None:
    done = check_config(configmap_config(KUBERNETES / "configmap.yaml", tmp_path), **configmap_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert REDIS_TEST_PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("allow: [retrieve, list]", "allow: [retrieve, delete]", "callers.0.allow"),
        ("url: ${REDIS_URL}", "url: http://cohere-gateway-redis:6379", "redis.url"),
    ],
)
def test_a_broken_configmap_config_fails_check_config(tmp_path: Path, old: str, new: str, path: str) -> None:
    broken = broken_copy(tmp_path, KUBERNETES / "configmap.yaml", old, new)
    done = check_config(configmap_config(broken, tmp_path), **configmap_env(tmp_path))
    assert done.returncode == 2
    assert path in done.stderr


# --- no shipped example holds a usable caller key ---------------------------------------------

ENVIRONMENT_REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*\}$")


def literal_caller_keys(config_text: str) -> list[str]:
    """The paths of caller keys (or digests) written into a config rather than taken from ${VAR} or a file."""
    callers = yaml.safe_load(config_text).get("callers") or []
    return [
        f"callers.{index}.{field}"
        for index, caller in enumerate(callers)
        for field in ("key", "key_sha256")
        if field in caller and not ENVIRONMENT_REFERENCE.match(str(caller[field]))
    ]


def shipped_configs() -> dict[str, str]:
    [configmap] = documents(KUBERNETES / "configmap.yaml")
    return {
        "config.yaml": (REPO / "config.yaml").read_text(encoding="utf-8"),
        "configmap.yaml": configmap["data"]["config.yaml"],
        "compose-config.yaml": COMPOSE_CONFIG.read_text(encoding="utf-8"),
    }


def test_no_shipped_config_writes_a_caller_key_or_digest_into_the_file() -> None:
    assert {name: literal_caller_keys(text) for name, text in shipped_configs().items()} == {
        name: [] for name in shipped_configs()
    }


def test_a_literal_caller_digest_fails_the_key_check() -> None:
    text = "callers:\n  - name: a\n    key_sha256: " + "0" * 64 + "\n  - name: b\n    key: ${B_KEY}\n"
    assert literal_caller_keys(text) == ["callers.0.key_sha256"]


def test_the_secrets_placeholder_caller_key_is_refused_so_the_kit_never_starts_with_it(tmp_path: Path) -> None:
    [secret] = documents(KUBERNETES / "secret.yaml")
    placeholder = secret["stringData"]["example-service-key"]
    config = configmap_config(KUBERNETES / "configmap.yaml", tmp_path)
    done = check_config(config, **configmap_env(tmp_path, caller_key=placeholder))
    assert done.returncode == 2
    assert "callers.0.key_file:" in done.stderr


@pytest.mark.parametrize("weak", ["some-key-of-16-chars-or-more", "1234567890123456", "demo-billing-key-0001"])
def test_the_configmaps_config_refuses_a_weak_or_demo_caller_key(tmp_path: Path, weak: str) -> None:
    config = configmap_config(KUBERNETES / "configmap.yaml", tmp_path)
    done = check_config(config, **configmap_env(tmp_path, caller_key=weak))
    assert done.returncode == 2
    assert "callers.0.key_file: " in done.stderr
    assert weak not in done.stderr


def test_the_deployment_runs_two_probed_non_root_read_only_replicas_that_outlast_the_grace() -> None:
    objects = kubernetes_objects()
    kinds = {kind for kind, _ in objects}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "StatefulSet"} <= kinds
    deployment = objects[GATEWAY]["spec"]
    pod = deployment["template"]["spec"]
    [container] = pod["containers"]
    assert deployment["replicas"] >= 2
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]

    config = yaml.safe_load(objects[("ConfigMap", "cohere-gateway")]["data"]["config.yaml"])
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + config["server"]["shutdown_grace_s"]

    # The token Secret is mounted (as a directory, so that a rotation reaches it) where token_file points.
    token_file = re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", config["upstream"]["token_file"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    [token_mount] = [m for m in mounts.values() if "secret" in volumes[m["name"]]]
    assert ("Secret", volumes[token_mount["name"]]["secret"]["secretName"]) in objects
    assert "subPath" not in token_mount
    assert str(Path(token_file).parent) == token_mount["mountPath"]
    assert config["store"]["path"].startswith(mounts["store"]["mountPath"] + "/")

    labels = deployment["template"]["metadata"]["labels"]
    assert objects[("Service", "cohere-gateway")]["spec"]["selector"].items() <= labels.items()
    assert (
        objects[("PodDisruptionBudget", "cohere-gateway")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    )


def redis_problems(folder: Path) -> list[str]:
    """What would keep the manifests' Redis from holding the records safely, or the gateway pods from reaching it."""
    objects = kubernetes_objects(folder)
    problems: list[str] = []
    redis = objects[REDIS]["spec"]
    pod = redis["template"]["spec"]
    container = only_container(objects, REDIS)
    args = [str(a) for a in container["args"]]
    options = dict(zip(args[::2], args[1::2], strict=True))
    if options.get("--appendonly") != "yes" or options.get("--appendfsync") != "everysec":
        problems.append("redis: no append-only file written every second (--appendonly yes --appendfsync everysec)")
    claims = {c["metadata"]["name"] for c in redis.get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if mounts.get(options.get("--dir", "")) not in claims:
        problems.append("redis: its --dir is not on a persistent volume claim")
    if pod["securityContext"].get("runAsNonRoot") is not True:
        problems.append("redis: may run as root")
    if container["securityContext"].get("readOnlyRootFilesystem") is not True:
        problems.append("redis: its root filesystem is writable")
    if not container.get("resources", {}).get("requests") or not container.get("resources", {}).get("limits"):
        problems.append("redis: no resource requests and limits")
    redis_env = {e["name"]: e for e in container.get("env", [])}
    from_secret = redis_env.get("REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef")
    if options.get("--requirepass") != "$(REDIS_PASSWORD)" or from_secret != REDIS_PASSWORD_REF:
        problems.append("redis: its password is not the Secret's (--requirepass $(REDIS_PASSWORD))")
    if ("Secret", REDIS_PASSWORD_REF["name"]) not in objects:
        problems.append(f"no Secret {REDIS_PASSWORD_REF['name']} for the Redis password")

    # The gateway pods: $REDIS_PASSWORD from the same Secret, defined before the $REDIS_URL that uses it.
    names = [e["name"] for e in only_container(objects, GATEWAY).get("env", [])]
    gateway_env = {e["name"]: e for e in only_container(objects, GATEWAY)["env"]} if names else {}
    if gateway_env.get("REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef") != REDIS_PASSWORD_REF:
        problems.append("gateway: $REDIS_PASSWORD is not the Redis Secret's")
    elif "REDIS_URL" not in names or names.index("REDIS_PASSWORD") > names.index("REDIS_URL"):
        problems.append("gateway: $REDIS_URL is missing, or comes before the $REDIS_PASSWORD it uses")
    else:
        url = urlsplit(redis_url_in_the_pods(objects, REDIS_TEST_PASSWORD))
        service = objects.get(("Service", url.hostname or ""), {}).get("spec", {})
        [port] = [p for p in container["ports"] if p["name"] == "redis"]
        redis_labels = redis["template"]["metadata"]["labels"]
        if url.password != REDIS_TEST_PASSWORD:
            problems.append("gateway: $REDIS_URL does not carry the password")
        if not service.get("selector") or not service["selector"].items() <= redis_labels.items():
            problems.append(f"gateway: $REDIS_URL names {url.hostname}, not a Service of the Redis pods")
        elif not any(
            p["port"] == url.port and p["targetPort"] in (port["name"], port["containerPort"]) for p in service["ports"]
        ):
            problems.append(f"gateway: $REDIS_URL's port {url.port} does not lead to Redis")
    config = yaml.safe_load(objects[("ConfigMap", "cohere-gateway")]["data"]["config.yaml"])
    if (config.get("redis") or {}).get("url") != "${REDIS_URL}":
        problems.append("configmap: redis.url is not ${REDIS_URL}")

    policy = objects.get(("NetworkPolicy", "cohere-gateway-redis"), {}).get("spec", {})
    gateway_labels = objects[GATEWAY]["spec"]["template"]["metadata"]["labels"]
    [redis_port] = [p["containerPort"] for p in container["ports"] if p["name"] == "redis"]
    admitted = [
        peer["podSelector"]["matchLabels"]
        for rule in policy.get("ingress", [])
        if any(p["port"] in (redis_port, "redis") for p in rule.get("ports", []))
        for peer in rule["from"]
    ]
    if not any(labels.items() <= gateway_labels.items() for labels in admitted):
        problems.append("networkpolicy: the gateway pods may not reach Redis's port")
    return problems


def test_the_redis_keeps_the_records_on_a_volume_behind_a_password_and_the_gateway_reaches_it() -> None:
    assert redis_problems(KUBERNETES) == []


@pytest.mark.parametrize(
    ("name", "old", "new", "problem"),
    [
        (
            "redis.yaml",
            '- --appendonly\n            - "yes"',
            '- --appendonly\n            - "no"',
            "no append-only file",
        ),
        ("redis.yaml", "mountPath: /data", "mountPath: /var/data", "not on a persistent volume claim"),
        ("redis.yaml", "- $(REDIS_PASSWORD)", "- hunter2", "its password is not the Secret's"),
        ("deployment.yaml", "@cohere-gateway-redis:6379", "@redis:6379", "names redis, not a Service"),
        ("deployment.yaml", "@cohere-gateway-redis:6379", "@cohere-gateway-redis:6380", "port 6380 does not lead"),
        ("configmap.yaml", "url: ${REDIS_URL}", "url: redis://cohere-gateway-redis:6379", "redis.url is not"),
        ("redis.yaml", "          port: 6379\n", "          port: 6380\n", "may not reach Redis's port"),
    ],
)
def test_a_broken_redis_manifest_fails_the_redis_check(
    tmp_path: Path, name: str, old: str, new: str, problem: str
) -> None:
    folder = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, folder)
    broken_copy(folder, KUBERNETES / name, old, new)
    problems = redis_problems(folder)
    assert len(problems) == 1
    assert problem in problems[0]


GATEWAY_POLICY = ("NetworkPolicy", "cohere-gateway")
# Peers that name who they let in: a labelled namespace or labelled pods, never a whole namespace or address range.
SCRAPER_PEERS = ("namespaceSelector", "podSelector")


def lets_in(rule_ports: list[dict[str, Any]], port: dict[str, Any]) -> bool:
    """Whether a rule's ports admit a container ``port`` (by its name or its number)."""
    return any(
        p.get("port") in (port["name"], port["containerPort"])
        and p.get("protocol", "TCP") == port.get("protocol", "TCP")
        for p in rule_ports
    )


def scrapers_only(peer: dict[str, Any]) -> bool:
    """A peer that admits labelled namespaces or pods only (``{}`` selects everything there is)."""
    if "ipBlock" in peer:
        return False
    return any(peer.get(kind, {}).get("matchLabels") for kind in SCRAPER_PEERS)


def gateway_policy_problems(folder: Path) -> list[str]:
    """What would keep the gateway pods' NetworkPolicy from admitting the Deployment's ports as the kit means.

    The API port from callers, the metrics port from Prometheus alone, and out
    DNS, Redis and HTTPS.
    """
    objects = kubernetes_objects(folder)
    labels = objects[GATEWAY]["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p for p in only_container(objects, GATEWAY)["ports"]}
    problems: list[str] = []
    policy = objects.get(GATEWAY_POLICY, {}).get("spec")
    if policy is None:
        return ["networkpolicy: no NetworkPolicy cohere-gateway"]
    selector = policy["podSelector"].get("matchLabels", {})
    if not selector or not selector.items() <= labels.items():
        problems.append("networkpolicy: it does not select the gateway pods")
    if set(policy.get("policyTypes", [])) != {"Ingress", "Egress"}:
        problems.append("networkpolicy: it does not govern both Ingress and Egress")
    ingress = policy.get("ingress", [])
    for name, port in ports.items():
        if not any(lets_in(rule.get("ports", []), port) for rule in ingress):
            problems.append(f"networkpolicy: the Deployment's port {name} is not let in")
    if "metrics" in ports:
        peers = [peer for rule in ingress if lets_in(rule.get("ports", []), ports["metrics"]) for peer in rule["from"]]
        if not all(scrapers_only(peer) for peer in peers):
            problems.append("networkpolicy: the metrics port is open beyond Prometheus")
    egress = policy.get("egress", [])

    def goes_out(port: int, protocol: str = "TCP") -> list[dict[str, Any]]:
        """The peers of the egress rules that let ``port`` out."""
        wanted = {"name": "", "containerPort": port, "protocol": protocol}
        return [peer for rule in egress if lets_in(rule.get("ports", []), wanted) for peer in rule.get("to", [])]

    if not goes_out(53, "UDP"):
        problems.append("networkpolicy: no DNS out")
    redis_labels = objects[REDIS]["spec"]["template"]["metadata"]["labels"]
    [redis_port] = [p["containerPort"] for p in only_container(objects, REDIS)["ports"] if p["name"] == "redis"]
    if not any(
        (peer.get("podSelector", {}).get("matchLabels") or {"": ""}).items() <= redis_labels.items()
        for peer in goes_out(redis_port)
    ):
        problems.append("networkpolicy: the gateway pods may not reach Redis")
    if not any("ipBlock" in peer for peer in goes_out(443)):
        problems.append("networkpolicy: no HTTPS out to the upstream")
    return problems


def test_the_gateway_pods_networkpolicy_admits_callers_and_prometheus_and_lets_out_dns_redis_and_https() -> None:
    assert gateway_policy_problems(KUBERNETES) == []


def scrape_port_problems(folder: Path) -> list[str]:
    """Whether Prometheus scrapes the port on which the ConfigMap's ``server.metrics_port`` serves ``/metrics``."""
    objects = kubernetes_objects(folder)
    template = objects[GATEWAY]["spec"]["template"]
    ports = {p["name"]: p for p in only_container(objects, GATEWAY)["ports"]}
    config = yaml.safe_load(objects[("ConfigMap", "cohere-gateway")]["data"]["config.yaml"])
    metrics_port = config["server"].get("metrics_port", 0)
    annotations = template["metadata"].get("annotations", {})
    if "metrics" not in ports or ports["metrics"]["containerPort"] != metrics_port:
        return [f"deployment: no port named metrics at the configmap's server.metrics_port ({metrics_port})"]
    if (
        annotations.get("prometheus.io/port") != str(metrics_port)
        or annotations.get("prometheus.io/path") != "/metrics"
    ):
        return ["deployment: the prometheus.io annotations do not name server.metrics_port and /metrics"]
    service = objects[("Service", "cohere-gateway")]["spec"]["ports"]
    if not any(p.get("targetPort") in ("metrics", metrics_port) for p in service):
        return ["service: no port leads to the metrics port"]
    return []


def test_prometheus_scrapes_the_port_the_configmap_serves_metrics_on() -> None:
    assert scrape_port_problems(KUBERNETES) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('prometheus.io/port: "9090"', 'prometheus.io/port: "8080"', "prometheus.io annotations"),
        ("containerPort: 9090", "containerPort: 9091", "no port named metrics"),
    ],
)
def test_a_scrape_port_that_is_not_the_metrics_port_fails_the_scrape_check(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    folder = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, folder)
    broken_copy(folder, KUBERNETES / "deployment.yaml", old, new)
    problems = scrape_port_problems(folder)
    assert len(problems) == 1
    assert problem in problems[0]


METRICS_FROM_MONITORING = (
    "        - namespaceSelector:\n            matchLabels:\n              kubernetes.io/metadata.name: monitoring\n"
)


@pytest.mark.parametrize(
    ("name", "old", "new", "problem"),
    [
        (
            "networkpolicy.yaml",
            "      app.kubernetes.io/name: cohere-gateway\n  policyTypes",
            "      app.kubernetes.io/name: gateway\n  policyTypes",
            "does not select the gateway pods",
        ),
        ("networkpolicy.yaml", 'policyTypes: ["Ingress", "Egress"]', 'policyTypes: ["Ingress"]', "Ingress and Egress"),
        ("networkpolicy.yaml", "          port: metrics", "          port: 9091", "port metrics is not let in"),
        ("networkpolicy.yaml", METRICS_FROM_MONITORING, "        - podSelector: {}\n", "open beyond Prometheus"),
        ("networkpolicy.yaml", "          port: 53", "          port: 5353", "no DNS out"),
        ("networkpolicy.yaml", "          port: 6379", "          port: 6380", "may not reach Redis"),
        ("networkpolicy.yaml", "          port: 443", "          port: 8443", "no HTTPS out"),
        ("deployment.yaml", "- name: metrics ", "- name: metricz ", "port metricz is not let in"),
    ],
)
def test_a_broken_networkpolicy_fails_the_policy_check(
    tmp_path: Path, name: str, old: str, new: str, problem: str
) -> None:
    folder = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, folder)
    broken_copy(folder, KUBERNETES / name, old, new)
    problems = gateway_policy_problems(folder)
    assert len(problems) == 1, problems
    assert problem in problems[0]
    assert kubernetes_validate(folder / name).returncode == 0  # valid Kubernetes, only not what the kit means


class ManifestRedis(RedisServer):
    """A real redis-server run with the StatefulSet's own arguments (on a free port and a temporary --dir)."""

    def __init__(self, args: list[str]) -> None:
        super().__init__()
        self.args = [a.replace("$(REDIS_PASSWORD)", REDIS_TEST_PASSWORD) for a in args]
        self.args[self.args.index("--dir") + 1] = self._dir.name

    @property
    def url(self) -> str:
        return f"redis://:{REDIS_TEST_PASSWORD}@127.0.0.1:{self.port}/0"

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 (a fixed program, the manifest's arguments)
            [REDIS_SERVER, *self.args, "--port", str(self.port), "--bind", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops the pod: Redis writes out its append-only file and exits."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=TOOL_TIMEOUT_S)


async def test_the_statefulsets_redis_needs_the_password_and_keeps_a_record_across_a_restart() -> None:
    server = ManifestRedis(only_container(kubernetes_objects(), REDIS)["args"])
    try:
        await server.start()
        stranger = aioredis.Redis(port=server.port, socket_timeout=5, protocol=2, retry=Retry(NoBackoff(), 0))
        with pytest.raises(AuthenticationError, match="Authentication required"):
            await stranger.ping()
        await stranger.aclose()
        client = server.client()
        settings = await client.config_get("*")
        assert (settings["appendonly"], settings["appendfsync"]) == ("yes", "everysec")
        assert settings["maxmemory-policy"] == "noeviction"
        await client.set("cohere-gateway:record", "billing-service")
        await client.aclose()

        server.stop()
        await server.start()  # the same --dir: the append-only file is read back
        client = server.client()
        assert await client.get("cohere-gateway:record") == b"billing-service"
        await client.aclose()
    finally:
        server.close()


# ---------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------


def compose_schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", path)


def test_the_compose_file_passes_the_compose_schema() -> None:
    done = compose_schema_check(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("stop_grace_period: 15s", "stop_grace_period: [15s]"),  # a wrong type
        ("    ports:\n", "    portz:\n"),  # an unknown service key
    ],
)
def test_a_broken_compose_file_fails_the_compose_schema(tmp_path: Path, old: str, new: str) -> None:
    done = compose_schema_check(broken_copy(tmp_path, COMPOSE, old, new))
    assert done.returncode != 0


COMPOSE_ENV = {"COHERE_API_KEY": "a-token-for-the-check", "EXAMPLE_GATEWAY_KEY": "a-caller-key-for-the-check"}
COMPOSE_CONFIG = REPO / "deploy" / "compose-config.yaml"


def compose_problems(compose: Path) -> list[str]:
    """What would keep the compose replicas from sharing one Redis that keeps the records."""
    [document] = documents(compose)
    services = document["services"]
    problems: list[str] = []
    redis = services.get("redis", {})
    command = [str(part) for part in redis.get("command", [])]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    if options.get("--appendonly") != "yes" or options.get("--appendfsync") != "everysec":
        problems.append("redis: no append-only file written every second (--appendonly yes --appendfsync everysec)")
    if not any(
        str(v).split(":")[0] in document.get("volumes", {}) and str(v).endswith(":/data")
        for v in redis.get("volumes", [])
    ):
        problems.append("redis: /data is not on a named volume")
    gateways = {name: s for name, s in services.items() if name != "redis"}
    if len(gateways) != 2:
        problems.append(f"{len(gateways)} gateway replicas, not 2")
    for name, service in gateways.items():
        url = urlsplit(str(service.get("environment", {}).get("REDIS_URL", "")))
        if url.scheme != "redis" or url.hostname != "redis" or (url.port or 6379) != 6379:
            problems.append(f"{name}: REDIS_URL does not point at the redis service")
        if not any("compose-config.yaml:" in v for v in service.get("volumes", [])):
            problems.append(f"{name}: does not read compose-config.yaml")
    return problems


def test_the_compose_replicas_share_a_redis_that_keeps_the_records_and_their_config_passes_check_config() -> None:
    assert compose_problems(COMPOSE) == []
    [compose] = documents(COMPOSE)
    redis_url = compose["x-gateway"]["environment"]["REDIS_URL"]
    assert yaml.safe_load(COMPOSE_CONFIG.read_text(encoding="utf-8"))["redis"]["url"] == "${REDIS_URL}"
    done = check_config(COMPOSE_CONFIG, **COMPOSE_ENV, REDIS_URL=redis_url)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('"--appendonly", "yes"', '"--appendonly", "no"', "redis: no append-only file"),
        ("redis-data:/data", "/tmp/redis:/data", "redis: /data is not on a named volume"),
        ("REDIS_URL: redis://redis:6379/0", "REDIS_URL: redis://localhost:6379/0", "does not point at the redis"),
    ],
)
def test_a_broken_compose_redis_fails_the_compose_check(tmp_path: Path, old: str, new: str, problem: str) -> None:
    problems = compose_problems(broken_copy(tmp_path, COMPOSE, old, new))
    assert problems
    assert all(problem in p for p in problems)


def test_a_broken_compose_config_fails_check_config(tmp_path: Path) -> None:
    broken = broken_copy(tmp_path, COMPOSE_CONFIG, "requests_per_s: 10", "requests_per_s: -5")
    done = check_config(broken, **COMPOSE_ENV, REDIS_URL="redis://redis:6379/0")
    assert done.returncode == 2
    assert "upstream.rate_limit.requests_per_s" in done.stderr


# ---------------------------------------------------------------------------
# Prometheus rules
# ---------------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = run(promtool(), "check", "rules", ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool(), "test", "rules", ALERT_TESTS, cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_says_what_to_do() -> None:
    [group] = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    names = {rule["alert"] for rule in group["rules"]}
    assert {
        "CohereGatewayUpstreamAuthFailed",
        "CohereGatewayBreakerOpen",
        "CohereGatewayBudgetSpent",
        "CohereGatewayReloadFailed",
        "CohereGatewayErrors5xx",
        "CohereGatewayRedisLost",
    } <= names
    for rule in group["rules"]:
        assert len(rule["annotations"]["action"]) > 80, rule["alert"]


def test_a_broken_rule_fails_promtool_check(tmp_path: Path) -> None:
    broken = broken_copy(
        tmp_path, ALERTS, "max_over_time(gateway_breaker_state[2m])", "max_over_time(gateway_breaker_state[2m]"
    )
    assert run(promtool(), "check", "rules", broken).returncode != 0


def test_a_rule_that_no_longer_fires_fails_promtool_test(tmp_path: Path) -> None:
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    broken_copy(tmp_path, ALERTS, '{outcome=~"401|403"}', '{outcome=~"401"}')
    broken_copy(tmp_path, ALERT_TESTS, 'outcome="401"', 'outcome="403"')
    assert run(promtool(), "test", "rules", ALERT_TESTS.name, cwd=tmp_path).returncode != 0


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("min by (job, instance) (gateway_redis_up) == 0", "min by (job, instance) (gateway_redis_up) < 0"),  # never
        ("(gateway_redis_up) == 0\n        for: 2m", "(gateway_redis_up) == 0\n        for: 0m"),  # a blip pages
    ],
)
def test_a_redis_lost_rule_that_fires_wrongly_fails_promtool_test(tmp_path: Path, old: str, new: str) -> None:
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    broken_copy(tmp_path, ALERTS, old, new)
    tested = run(promtool(), "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert tested.returncode != 0
    assert "CohereGatewayRedisLost" in tested.stdout + tested.stderr


# ---------------------------------------------------------------------------
# Metric names against a running gateway
# ---------------------------------------------------------------------------


REDIS_LOST_WITHIN_S = 5.0


async def exported_metrics(
    upstream: Upstream, start: GatewayFactory, redis_server: RedisServer
) -> tuple[str, Exported]:
    """A gateway's /metrics, with redis.url set, after requests that make every labelled series the kit uses exist.

    Redis is stalled (SIGSTOP) until the gateway loses it, then continued until
    it regains it: gateway_redis_transitions_total and gateway_redis_errors_total.
    """
    upstream.script(json_handler(body=batch_body(status="BATCH_STATUS_QUEUED")))
    config = make_config(
        upstream.url,
        upstream={"rate_limit": {"requests_per_s": 0.01, "burst": 2}, "budget_wait_s": 0},
        cache={"max_entries": 1},
        callers=[
            {"name": "billing-service", "key": BILLING_KEY},
            {"name": "reporting", "key": REPORTING_KEY, "rate_limit": {"requests_per_s": 0.01, "burst": 4}},
        ],
        redis={"url": redis_server.url, "probe_interval_s": 0.1},
    )
    gateway_ = await start(config)
    async with ClientSession(headers={"Authorization": f"Bearer {REPORTING_KEY}"}) as session:
        for path, headers in [
            ("batch-1", {}),  # a miss, then a hit: requests, upstream calls and latency, a shared flight
            ("batch-1", {"Prefer": "wait=1"}),  # held, then a timeout: waiters, waits_ended, refresh interval
            ("batch-2", {}),  # evicts batch-1 (max_entries 1): cache_removals
            ("batch-3", {}),  # over the budget: upstream_rejected
            ("batch-3", {}),  # over the caller's own limit: caller_rate_limited
        ]:
            async with session.get(f"{gateway_.url}/v2/batches/{path}", headers=headers) as response:
                await response.read()
    assert await reload_config(gateway_.state, lambda: config)  # config_reloads

    link = gateway_.state.redis
    assert link is not None
    lost = asyncio.Event()
    link.on_lost.append(lost.set)
    redis_server.pause()  # the next Redis call (a heartbeat, within 1 s) passes redis.timeout_s
    try:
        async with asyncio.timeout(REDIS_LOST_WITHIN_S):
            await lost.wait()
    finally:
        redis_server.resume()
    async with asyncio.timeout(REDIS_LOST_WITHIN_S):
        await link.until_up()

    text, _ = await scrape_metrics(gateway_.url)
    assert 'gateway_redis_transitions_total{event="lost"} 1.0' in text
    assert 'gateway_redis_transitions_total{event="regained"} 1.0' in text
    assert "gateway_redis_up 1.0" in text
    return text, exported_from_text(text, gateway_.state.metrics.registry)


async def test_the_dashboard_and_the_rules_name_only_metrics_and_labels_the_gateway_exports(
    upstream: Upstream, start: GatewayFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    _, exported = await exported_metrics(upstream, start, redis_server)
    assert metric_problems(REPO, exported) == []

    # A copy whose dashboard names metrics the gateway lacks and groups by a label they lack, and whose
    # rules do the same.
    root = tmp_path / "repo"
    shutil.copytree(REPO / "deploy", root / "deploy")
    dashboard = broken_copy(root / "deploy" / "grafana", DASHBOARD, "gateway_waiters{", "gateway_waiting{")
    broken_copy(root / "deploy" / "grafana", dashboard, "gateway_redis_up{", "gateway_redis_connected{")
    broken_copy(root / "deploy" / "grafana", dashboard, "sum by (role)", "sum by (outcome)")
    alerts = broken_copy(
        root / "deploy" / "prometheus",
        ALERTS,
        "sum by (job, instance) (rate(gateway_upstream_rejected",
        "sum by (job, route) (rate(gateway_upstream_rejected",
    )
    broken_copy(
        root / "deploy" / "prometheus",
        alerts,
        'gateway_requests_total{status=~"5.."}',
        'gateway_requests_total{code=~"5.."}',
    )
    broken_copy(root / "deploy" / "prometheus", alerts, "(gateway_redis_up)", "(gateway_redis_ok)")
    problems = metric_problems(root, exported)
    assert any("gateway exports no metric gateway_waiting" in p for p in problems)
    assert any(
        "panel 'Redis up, per process' A: the gateway exports no metric gateway_redis_connected" in p for p in problems
    )
    assert any(
        "panel 'Shared flights by role' A: no metric in the expression has the label outcome" in p for p in problems
    )
    assert any("CohereGatewayBudgetSpent: no metric in the expression has the label route" in p for p in problems)
    assert any("gateway_requests_total has no label code" in p for p in problems)
    assert any("CohereGatewayRedisLost: the gateway exports no metric gateway_redis_ok" in p for p in problems)
    assert len(problems) == 6


async def test_every_metric_the_gateway_exports_has_a_row_in_the_observability_doc(
    upstream: Upstream, start: GatewayFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    text, _ = await exported_metrics(upstream, start, redis_server)
    assert documented_metric_problems(REPO, text) == []

    (tmp_path / "docs").mkdir()
    broken_copy(tmp_path / "docs", REPO / "docs" / "observability.md", "| `gateway_waiters` |", "| waiters |")
    broken = broken_copy(tmp_path / "docs", tmp_path / "docs" / "observability.md", "| `gateway_redis_up` |", "| up |")
    assert broken.name == "observability.md"
    assert documented_metric_problems(tmp_path, text) == [
        "docs/observability.md has no row for the metric gateway_waiters",
        "docs/observability.md has no row for the metric gateway_redis_up",
    ]


async def test_metrics_report_the_version_as_build_info(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    gateway_ = await start(make_config(upstream.url))
    _, samples = await scrape_metrics(gateway_.url)
    [(labels, value)] = [(dict(k[1]), v) for k, v in samples.items() if k[0] == "gateway_build_info"]
    assert value == 1
    assert labels["version"] == gateway.__version__
    assert labels["python"] == ".".join(map(str, sys.version_info[:3]))


def test_version_prints_the_one_version_that_the_changelog_and_the_package_carry() -> None:
    from importlib.metadata import version

    done = run(sys.executable, "-m", "gateway", "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"cohere-gateway {gateway.__version__}"
    assert version("cohere-gateway") == gateway.__version__
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.MULTILINE)
    assert releases[0] == gateway.__version__
    assert releases[-1] == "0.1.0"
