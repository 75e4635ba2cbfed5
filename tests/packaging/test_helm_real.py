"""The Helm chart helm/auth-sidecar through the real tools (.ci/install-helm-tools installs them).

helm 4 lints the chart (`--strict`, which applies values.schema.json) and renders it with the
default values, in sidecar mode and with every example values file; a small app chart that
depends on this one renders examples/sidecar-deployment.yaml, the sidecar-mode pod. The
rendered manifests are parsed and checked as Kubernetes objects (security contexts, probes,
resources, the optional resources and how they select each other, the config checksum), the
rendered ConfigMap must pass `auth-sidecar check-config` with just the environment the
rendered pod gives the container, checkov must find nothing (the chart's Deployment says, in
`checkov.io/skip-…` annotations, which checks do not apply and why) and `helm package` must
build the chart archive. Without the tools these tests skip; with `CI` set they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import __version__
from tests.support.environment import CALLER_ENVIRONMENT
from tests.support.helm import CHECKOV, checkov, run_helm, start_checkov
from tests.support.keys import TEST_KEY
from tests.support.repo import REPO_ROOT

CHART = REPO_ROOT / "helm" / "auth-sidecar"
EXAMPLES = CHART / "examples"
APP_TEMPLATE = EXAMPLES / "sidecar-deployment.yaml"
RELEASE = "app"
NAMESPACE = "auth"
FULLNAME = f"{RELEASE}-auth-sidecar"
CONTAINER = "auth-sidecar"
DIGEST = "sha256:" + "ab" * 32

# What the Secret holds, by the variable the pod maps each key to (SESSION_KEY must be a key).
SECRET_VALUES = {
    "OIDC_CLIENT_SECRET": "client-secret",
    "SESSION_KEY": TEST_KEY,
    "REDIS_PASSWORD": "redis-password",
    "REDIS_SENTINEL_PASSWORD": "sentinel-password",
}


@dataclass(frozen=True)
class Case:
    """One rendering: `helm template` with these values files and `--set`s, or the app chart."""

    name: str
    files: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    app_chart: bool = False

    def args(self) -> list[str]:
        out: list[str] = []
        for name in self.files:
            out += ["-f", str(EXAMPLES / name)]
        for assignment in self.sets:
            out += ["--set", assignment]
        return out


DEFAULT = Case("default")
SIDECAR_MODE = Case("sidecar-mode", sets=("mode=sidecar",))
MEMORY = Case("single-replica-memory", files=("single-replica-memory.yaml",))
SENTINEL = Case("ha-sentinel", files=("ha-sentinel.yaml",))
CLUSTER = Case("redis-cluster", files=("redis-cluster.yaml",))
SIDECAR_VALUES = Case("sidecar-values", files=("sidecar-values.yaml",))
APP = Case("app-chart", app_chart=True)  # examples/sidecar-deployment.yaml + sidecar-values.yaml

CHART_CASES = [DEFAULT, SIDECAR_MODE, MEMORY, SENTINEL, CLUSTER, SIDECAR_VALUES]
STANDALONE_CASES = [DEFAULT, MEMORY, SENTINEL, CLUSTER]
POD_CASES = [*STANDALONE_CASES, APP]  # every rendering with the sidecar's container in a pod

# What each rendering holds, as (kind, name).
BASE = {
    ("ServiceAccount", FULLNAME),
    ("ConfigMap", FULLNAME),
    ("Service", FULLNAME),
    ("Deployment", FULLNAME),
}
EXPECTED_RESOURCES = {
    "default": BASE,
    "sidecar-mode": {("ConfigMap", FULLNAME)},
    "single-replica-memory": BASE | {("Ingress", FULLNAME)},
    "ha-sentinel": BASE
    | {
        ("PodDisruptionBudget", FULLNAME),
        ("Service", f"{FULLNAME}-metrics"),
        ("ServiceMonitor", FULLNAME),
    },
    "redis-cluster": BASE
    | {
        ("HorizontalPodAutoscaler", FULLNAME),
        ("PodDisruptionBudget", FULLNAME),
        ("NetworkPolicy", FULLNAME),
    },
    "sidecar-values": {("ConfigMap", FULLNAME)},
    "app-chart": {
        ("ConfigMap", FULLNAME),
        ("Deployment", f"{RELEASE}-myapp"),
        ("Service", f"{RELEASE}-myapp"),
    },
}


def case_id(case: Case) -> str:
    return case.name


# --- rendering ----------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


class Renderer:
    """`helm template`, each distinct rendering run once per module."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.texts: dict[tuple[Case, str, str], str] = {}
        self._app_chart: Path | None = None

    def app_chart(self) -> Path:
        """A chart "myapp" depending on this one (file://), with examples/sidecar-deployment.yaml
        as its template and examples/sidecar-values.yaml under `auth-sidecar:`, as that
        example describes."""
        if self._app_chart is None:
            chart = self.folder / "myapp"
            (chart / "templates").mkdir(parents=True)
            version = load_yaml(CHART / "Chart.yaml")["version"]
            dependency = {
                "name": "auth-sidecar",
                "version": version,
                "repository": f"file://{CHART}",
            }
            meta = {"apiVersion": "v2", "name": "myapp", "version": "1.0.0"}
            meta |= {"dependencies": [dependency]}
            (chart / "Chart.yaml").write_text(yaml.safe_dump(meta), encoding="utf-8")
            values = {"auth-sidecar": load_yaml(EXAMPLES / "sidecar-values.yaml")}
            (chart / "values.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
            template = APP_TEMPLATE.read_text(encoding="utf-8")
            (chart / "templates" / "deployment.yaml").write_text(template, encoding="utf-8")
            run_helm("dependency", "update", chart)
            self._app_chart = chart
        return self._app_chart

    def text(self, case: Case, release: str = RELEASE, namespace: str = NAMESPACE) -> str:
        key = (case, release, namespace)
        if key not in self.texts:
            chart = self.app_chart() if case.app_chart else CHART
            args = ["template", release, chart, "--namespace", namespace, *case.args()]
            self.texts[key] = run_helm(*args).stdout
        return self.texts[key]

    def docs(self, case: Case) -> list[dict[str, Any]]:
        """The rendered objects (fresh copies: a test may change them)."""
        return [d for d in yaml.safe_load_all(self.text(case)) if d is not None]


@pytest.fixture(scope="module")
def helm_render(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    return Renderer(tmp_path_factory.mktemp("helm"))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} rendered"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Deployment whose pods run the sidecar (the chart's, or the app chart's)."""
    found = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and any(c["name"] == CONTAINER for c in d["spec"]["template"]["spec"]["containers"])
    ]
    assert len(found) == 1
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = deployment(docs)["spec"]["template"]["spec"]
    (found,) = [c for c in pod["containers"] if c["name"] == CONTAINER]
    return found


def sidecar_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    text = find(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


# --- helm lint ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CHART_CASES, ids=case_id)
def test_lint_strict(case: Case) -> None:
    out = run_helm("lint", "--strict", CHART, *case.args()).stdout
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_lint_strict_app_chart(helm_render: Renderer) -> None:
    """The sidecar-mode worked example, as a template of the app's chart, lints clean."""
    out = run_helm("lint", "--strict", helm_render.app_chart()).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out, out


@pytest.mark.parametrize(
    ("assignment", "mentions"),
    [
        ("replicas=3", "replicas"),  # a typo of replicaCount
        ("mode=sidecars", "mode"),
        ("config.server.listn=0.0.0.0:4180", "listn"),
        ("image.digest=latest", "digest"),
        ("podDisruptionBudget.enabled=yes", "enabled"),
    ],
)
def test_helm_applies_the_schema(assignment: str, mentions: str) -> None:
    """values.schema.json is enforced by helm itself: a bad value fails lint and template."""
    lint = run_helm("lint", "--strict", CHART, "--set", assignment, check=False)
    assert lint.returncode != 0 and mentions in lint.stdout + lint.stderr, lint.stdout
    rendered = run_helm("template", RELEASE, CHART, "--set", assignment, check=False)
    assert rendered.returncode != 0 and "schema" in rendered.stderr, rendered.stderr


# --- what is rendered ---------------------------------------------------------------------


@pytest.mark.parametrize("case", [*CHART_CASES, APP], ids=case_id)
def test_renders_the_expected_resources(case: Case, helm_render: Renderer) -> None:
    docs = helm_render.docs(case)
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == EXPECTED_RESOURCES[case.name]
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    for doc in docs:
        if doc["metadata"]["name"].startswith(FULLNAME):
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert labels["app.kubernetes.io/version"] == __version__


def test_no_secret_is_rendered(helm_render: Renderer) -> None:
    """Secrets never go through values: the chart renders no Secret in any case."""
    for case in [*CHART_CASES, APP]:
        assert "Secret" not in kinds(helm_render.docs(case)), case.name


OPTIONAL = {
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
    "NetworkPolicy",
    "Ingress",
    "metrics Service",
}


def optional_resources(docs: list[dict[str, Any]]) -> set[str]:
    found = kinds(docs) & OPTIONAL
    if any(d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics") for d in docs):
        found.add("metrics Service")
    return found


SWITCHES: list[tuple[tuple[str, ...], set[str]]] = [
    ((), set()),
    (("replicaCount=3",), {"PodDisruptionBudget"}),
    (("replicaCount=3", "podDisruptionBudget.enabled=false"), set()),
    (("autoscaling.enabled=true",), {"HorizontalPodAutoscaler", "PodDisruptionBudget"}),
    (("autoscaling.enabled=true", "autoscaling.minReplicas=1"), {"HorizontalPodAutoscaler"}),
    (("serviceMonitor.enabled=true",), {"ServiceMonitor", "metrics Service"}),
    (("metrics.service.enabled=true",), {"metrics Service"}),
    (("networkPolicy.enabled=true",), {"NetworkPolicy"}),
    (("ingress.enabled=true",), {"Ingress"}),
    (
        (
            "mode=sidecar",
            "replicaCount=3",
            "autoscaling.enabled=true",
            "serviceMonitor.enabled=true",
            "networkPolicy.enabled=true",
            "ingress.enabled=true",
        ),
        set(),
    ),
]


@pytest.mark.parametrize(
    ("sets", "expected"),
    [pytest.param(s, e, id=",".join(s) or "defaults") for s, e in SWITCHES],
)
def test_optional_resources_follow_their_switches(
    sets: tuple[str, ...], expected: set[str], helm_render: Renderer
) -> None:
    docs = helm_render.docs(Case("switches", sets=sets))
    assert optional_resources(docs) == expected
    if "mode=sidecar" in sets:
        assert kinds(docs) == {"ConfigMap"}


EVERYTHING = Case(
    "everything",
    sets=(
        "replicaCount=3",
        "autoscaling.enabled=true",
        "serviceMonitor.enabled=true",
        "networkPolicy.enabled=true",
        "ingress.enabled=true",
    ),
)


def test_optional_resources_point_at_the_pods(helm_render: Renderer) -> None:
    """Each selector selects the sidecar's pods, each named port exists where it is named."""
    docs = helm_render.docs(EVERYTHING)
    assert optional_resources(docs) == OPTIONAL
    dep = find(docs, "Deployment", FULLNAME)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels)
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    port_names = {p["name"] for p in container(docs)["ports"]}
    assert port_names == {"proxy", "management"}

    pdb = find(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1

    hpa = find(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", FULLNAME)
    assert hpa["spec"]["minReplicas"] >= 2

    public = find(docs, "Service", FULLNAME)
    assert selects(public["spec"]["selector"], pod_labels)
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["proxy"]

    metrics = find(docs, "Service", f"{FULLNAME}-metrics")
    assert selects(metrics["spec"]["selector"], pod_labels)
    assert [(p["name"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [
        ("metrics", "management")
    ]
    monitor = find(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    assert not selects(monitor["spec"]["selector"]["matchLabels"], public["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [
        ("metrics", "/metrics")
    ]

    policy = find(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == port_names

    ingress = find(docs, "Ingress")
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends and all(b == {"name": FULLNAME, "port": {"name": "http"}} for b in backends)
    assert [p["name"] for p in public["spec"]["ports"]] == ["http"]


# --- the pod --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", POD_CASES, ids=case_id)
def test_security_contexts(case: Case, helm_render: Renderer) -> None:
    docs = helm_render.docs(case)
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    if "ServiceAccount" in kinds(docs):  # standalone: its own account, without an API token
        account = find(docs, "ServiceAccount")
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert account["automountServiceAccountToken"] is False
    ctx = container(docs)["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == ctx["runAsGroup"] == 10001  # the Dockerfile's USER
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not ctx.get("privileged")
    for other in pod["containers"]:  # the app's container in the sidecar example, too
        assert other["securityContext"]["allowPrivilegeEscalation"] is False
        assert other["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("case", POD_CASES, ids=case_id)
def test_volumes_and_config_file(case: Case, helm_render: Renderer) -> None:
    """The root filesystem is read-only: /tmp is an emptyDir; the config is the ConfigMap."""
    docs = helm_render.docs(case)
    pod = deployment(docs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    config = mounts["/etc/auth-sidecar"]
    assert config["readOnly"] is True
    assert volumes[config["name"]]["configMap"]["name"] == FULLNAME
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["AUTH_SIDECAR_CONFIG"]["value"] == "/etc/auth-sidecar/config.yaml"
    assert "config.yaml" in find(docs, "ConfigMap", FULLNAME)["data"]


@pytest.mark.parametrize("case", POD_CASES, ids=case_id)
def test_probes_use_the_management_port(case: Case, helm_render: Renderer) -> None:
    docs = helm_render.docs(case)
    sidecar = container(docs)
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    config = sidecar_config(docs)
    assert ports["management"] == port_of(config["management"]["listen"])
    assert ports["proxy"] == port_of(config["server"]["listen"])
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "management"}, probe
        assert sidecar[probe]["periodSeconds"] > 0 and sidecar[probe]["failureThreshold"] > 0


@pytest.mark.parametrize("case", POD_CASES, ids=case_id)
def test_resources_are_set(case: Case, helm_render: Renderer) -> None:
    docs = helm_render.docs(case)
    pod = deployment(docs)["spec"]["template"]["spec"]
    for each in pod["containers"]:
        resources = each["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], each["name"]
        assert resources["limits"]["memory"], each["name"]


@pytest.mark.parametrize("case", POD_CASES, ids=case_id)
def test_termination_grace_and_image(case: Case, helm_render: Renderer) -> None:
    docs = helm_render.docs(case)
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert (
        pod["terminationGracePeriodSeconds"]
        == load_yaml(CHART / "values.yaml")["terminationGracePeriodSeconds"]
    )
    assert container(docs)["image"] == f"auth-sidecar:{__version__}"


def test_image_digest_pins_the_image(helm_render: Renderer) -> None:
    docs = helm_render.docs(Case("digest", sets=(f"image.digest={DIGEST}",)))
    assert container(docs)["image"] == f"auth-sidecar:{__version__}@{DIGEST}"


# --- the config checksum ----------------------------------------------------------------


def checksum(helm_render: Renderer, case: Case) -> str:
    annotations = deployment(helm_render.docs(case))["spec"]["template"]["metadata"]["annotations"]
    (key,) = [k for k in annotations if k.startswith("checksum/")]
    value: str = annotations[key]
    return value


@pytest.mark.parametrize("case", POD_CASES, ids=case_id)
def test_config_checksum_is_the_mounted_config(case: Case, helm_render: Renderer) -> None:
    """checksum/config is the sha256 of exactly what the ConfigMap mounts (less the final
    newline of the YAML block), so any change to the file changes the pod template."""
    text = find(helm_render.docs(case), "ConfigMap", FULLNAME)["data"]["config.yaml"]
    assert (
        checksum(helm_render, case) == hashlib.sha256(text.removesuffix("\n").encode()).hexdigest()
    )


def test_config_change_rolls_the_pods(helm_render: Renderer) -> None:
    before = checksum(helm_render, DEFAULT)
    assert checksum(helm_render, Case("debug", sets=("config.logging.level=debug",))) != before
    assert checksum(helm_render, Case("more-replicas", sets=("replicaCount=2",))) == before
    app_before = checksum(helm_render, APP)
    changed = Case("app-debug", sets=("auth-sidecar.config.logging.level=debug",), app_chart=True)
    assert checksum(helm_render, changed) != app_before


# --- check-config and checkov: started once, before the module's first test ---------------

SECRET_ENV_SKIP = "CKV_K8S_35"
IMAGE_SKIPS = {"CKV_K8S_43", "CKV_K8S_15"}
CPU_LIMIT_SKIP = "CKV_K8S_11"
NETWORK_POLICY_SKIP = "CKV2_K8S_6"
ALL_SKIPS = {SECRET_ENV_SKIP, *IMAGE_SKIPS, CPU_LIMIT_SKIP, NETWORK_POLICY_SKIP}
HARDENED = Case(
    "hardened",
    sets=(f"image.digest={DIGEST}", "resources.limits.cpu=1", "networkPolicy.enabled=true"),
)
# The checks each rendering skips (checkov.io/skip-… annotations on the Deployment).
EXPECTED_SKIPS = {
    "default": ALL_SKIPS,
    "sidecar-mode": set(),
    "single-replica-memory": ALL_SKIPS,
    "ha-sentinel": ALL_SKIPS,
    "redis-cluster": ALL_SKIPS - {NETWORK_POLICY_SKIP},
    "sidecar-values": set(),
    "app-chart": ALL_SKIPS,
    "everything": ALL_SKIPS - {NETWORK_POLICY_SKIP},
    "hardened": {SECRET_ENV_SKIP},  # the other skips go when their reason does
}
# The kinds the chart renders that checkov 3 has checks for (none for PodDisruptionBudget,
# HorizontalPodAutoscaler, NetworkPolicy or ServiceMonitor).
CHECKED_KINDS = {"Deployment", "Service", "ServiceAccount", "ConfigMap", "Ingress"}
CHECKOV_CASES = [*CHART_CASES, APP, EVERYTHING, HARDENED]
NO_SESSION_KEY = "default without SESSION_KEY"


def pod_environment(sidecar: dict[str, Any]) -> dict[str, str]:
    """The variables the container gets: literal values, and the Secret's keys as
    SECRET_VALUES; a key the pod marks optional is left out (as when the Secret lacks it)."""
    env: dict[str, str] = {}
    for item in sidecar["env"]:
        name = item["name"]
        if "value" in item:
            env[name] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        if not ref.get("optional"):
            assert name in SECRET_VALUES, f"a Secret key the tests have no value for: {name}"
            env[name] = SECRET_VALUES[name]
    env.pop("AUTH_SIDECAR_CONFIG")  # --config names the file instead
    return env


def start_check_config(config: str, env: dict[str, str], folder: Path) -> subprocess.Popen[str]:
    """`python -m sidecar check-config` on `config`, with `env` and none of the caller's
    sidecar variables."""
    folder.mkdir()
    path = folder / "config.yaml"
    path.write_text(config, encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if k not in CALLER_ENVIRONMENT}
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "check-config", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**base, **env},
        cwd=folder,
    )


@dataclass
class Started:
    folder: Path
    check_config: dict[str, subprocess.Popen[str]]
    checkov: subprocess.Popen[bytes] | None  # None: not installed (the checkov tests say so)

    def processes(self) -> list[subprocess.Popen[Any]]:
        return [*self.check_config.values(), *([self.checkov] if self.checkov else [])]


@pytest.fixture(scope="module", autouse=True)
def started(helm_render: Renderer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """The slow processes run while the other tests do: check-config (~1 s each) on the
    ConfigMap of every rendering with a pod, and one checkov run (~5 s, mostly start-up) over
    every rendering, each in its own file. For checkov each rendering gets its own release
    name and namespace, so that a graph check ("a NetworkPolicy selects these pods") never
    pairs resources of two renderings."""
    folder = tmp_path_factory.mktemp("started")
    check_config: dict[str, subprocess.Popen[str]] = {}
    for i, case in enumerate(POD_CASES):
        docs = helm_render.docs(case)
        config = find(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
        env = pod_environment(container(docs))
        check_config[case.name] = start_check_config(config, env, folder / f"config-{i}")
        if case is DEFAULT:
            del env["SESSION_KEY"]
            check_config[NO_SESSION_KEY] = start_check_config(config, env, folder / "config-bad")
    rendered = folder / "rendered"
    rendered.mkdir()
    for i, case in enumerate(CHECKOV_CASES):
        text = helm_render.text(case, release=f"r{i}", namespace=f"ns-{case.name}")
        (rendered / f"{case.name}.yaml").write_text(text, encoding="utf-8")
    checkov = None
    if CHECKOV.is_file():
        args = ["--directory", rendered, "--framework", "kubernetes", "--output", "json"]
        with (folder / "checkov.json").open("wb") as out:
            checkov = start_checkov(*args, stdout=out, stderr=folder / "checkov.err")
    state = Started(folder, check_config, checkov)
    yield state
    for proc in state.processes():
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --- the rendered config is a valid sidecar configuration ----------------------------------


def check_config_result(started: Started, name: str) -> tuple[int, str]:
    proc = started.check_config[name]
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.mark.parametrize("case", POD_CASES, ids=case_id)
def test_rendered_config_passes_check_config(case: Case, started: Started) -> None:
    """`auth-sidecar check-config` accepts the ConfigMap's file with only the environment the
    rendered pod provides: every ${…} reference in it is covered by the pod's env."""
    code, out = check_config_result(started, case.name)
    assert code == 0, out
    assert "configuration is valid" in out


def test_check_config_needs_the_pods_secrets(started: Started) -> None:
    """The check above is not vacuous: without the Secret's session key the config fails."""
    code, out = check_config_result(started, NO_SESSION_KEY)
    assert code != 0 and "SESSION_KEY" in out, out


# --- checkov ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report(started: Started) -> dict[str, Any]:
    checkov()  # skips, or fails under CI, when checkov is not installed
    assert started.checkov is not None
    code = started.checkov.wait(timeout=300)
    stderr = (started.folder / "checkov.err").read_text(encoding="utf-8", errors="replace")
    assert code in (0, 1), stderr  # 1: some check failed
    output = (started.folder / "checkov.json").read_text(encoding="utf-8")
    report: dict[str, Any] = json.loads(output)
    assert isinstance(report, dict) and report["check_type"] == "kubernetes", output[:500]
    return report


def by_file(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["file_path"] == f"/{name}.yaml"]


@pytest.mark.parametrize("case", CHECKOV_CASES, ids=case_id)
def test_checkov_finds_nothing(
    case: Case, checkov_report: dict[str, Any], started: Started
) -> None:
    results = checkov_report["results"]
    assert results["parsing_errors"] == []
    failed = [
        f"{r['check_id']} {r['check_name']}: {r['resource']}"
        for r in by_file(results["failed_checks"], case.name)
    ]
    assert failed == []
    passed = by_file(results["passed_checks"], case.name)
    assert passed, "checkov checked nothing in this rendering"
    rendered = (started.folder / "rendered" / f"{case.name}.yaml").read_text(encoding="utf-8")
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    checked = {r["resource"].split(".")[0] for r in passed}
    assert kinds(docs) & CHECKED_KINDS <= checked, "checkov saw every object it has checks for"
    if "Deployment" in kinds(docs):
        pod_checks = {r["check_id"] for r in passed if r["resource"].startswith("Deployment.")}
        assert len(pod_checks) > 40, sorted(pod_checks)


@pytest.mark.parametrize("case", CHECKOV_CASES, ids=case_id)
def test_checkov_skips_only_what_the_chart_says(case: Case, checkov_report: dict[str, Any]) -> None:
    """Each skip is an annotation with its reason; no other check is skipped, and a skip
    disappears when its reason does (image.digest, a CPU limit, networkPolicy.enabled)."""
    skipped = by_file(checkov_report["results"]["skipped_checks"], case.name)
    assert {r["check_id"] for r in skipped} == EXPECTED_SKIPS[case.name]
    for record in skipped:
        reason = record["check_result"]["suppress_comment"]
        assert reason and reason != "No comment provided", record["check_id"]


# --- helm package ---------------------------------------------------------------------------


def test_helm_package(tmp_path: Path, helm_render: Renderer) -> None:
    """The chart packages; the archive lints and renders exactly like the chart directory."""
    chart = load_yaml(CHART / "Chart.yaml")
    run_helm("package", CHART, "--destination", tmp_path)
    archive = tmp_path / f"auth-sidecar-{chart['version']}.tgz"
    assert archive.is_file(), sorted(tmp_path.iterdir())
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for required in ("Chart.yaml", "values.yaml", "values.schema.json", "README.md"):
        assert f"auth-sidecar/{required}" in names
    templates = {p.name for p in (CHART / "templates").iterdir()}
    assert {n.rpartition("/")[2] for n in names if "/templates/" in n} == templates
    out = run_helm("lint", "--strict", archive).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out, out
    for case in (DEFAULT, SENTINEL):
        from_archive = run_helm(
            "template", RELEASE, archive, "--namespace", NAMESPACE, *case.args()
        ).stdout
        assert list(yaml.safe_load_all(from_archive)) == list(
            yaml.safe_load_all(helm_render.text(case))
        )
    shown = yaml.safe_load(run_helm("show", "chart", archive).stdout)
    assert (shown["version"], shown["appVersion"]) == (chart["version"], chart["appVersion"])


# --- versions -------------------------------------------------------------------------------


def test_versions_agree(helm_render: Renderer) -> None:
    """One release number: sidecar.__version__, Chart.yaml version and appVersion (chart and
    sidecar are released together), the default image tag, what helm renders, and the worked
    example's dependency pin."""
    chart = load_yaml(CHART / "Chart.yaml")
    values = load_yaml(CHART / "values.yaml")
    assert chart["appVersion"] == __version__
    assert chart["version"] == __version__
    assert values["image"]["tag"] == __version__
    docs = helm_render.docs(DEFAULT)
    assert container(docs)["image"] == f"{values['image']['repository']}:{__version__}"
    labels = find(docs, "Deployment", FULLNAME)["metadata"]["labels"]
    assert labels["app.kubernetes.io/version"] == __version__
    assert labels["helm.sh/chart"] == f"auth-sidecar-{chart['version']}"
    example = APP_TEMPLATE.read_text(encoding="utf-8")
    assert f"      version: {chart['version']}\n" in example, "the example's dependency pin"
