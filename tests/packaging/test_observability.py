"""The chart's Grafana dashboard and Prometheus alerts (docs/operations.md, "Dashboard and alerts").

The chart is rendered with the real helm (tests/support/helm.py); the PrometheusRule's groups,
exactly as rendered, go through `promtool check rules` and `promtool test rules` with the unit
tests of alerts_test.yaml beside this file; the dashboard's JSON is parsed and every metric its
queries (and the alerts) name must be in `/metrics` of a running sidecar with the Redis store.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from jsonschema.validators import validator_for
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import RefreshConfig
from sidecar.refresh import Outcome
from tests.support.configs import make_config
from tests.support.helm import run_helm
from tests.support.promtool import run_promtool
from tests.support.repo import REPO_ROOT
from tests.support.sidecars import StartSidecar, ready
from tests.support.stores import store_sections

CHART = REPO_ROOT / "helm" / "auth-sidecar"
DASHBOARD_FILE = CHART / "dashboards" / "auth-sidecar.json"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
OPERATIONS = REPO_ROOT / "docs" / "operations.md"
RELEASE, NAMESPACE = "app", "auth"  # what alerts_test.yaml's series and labels assume
FULLNAME = f"{RELEASE}-auth-sidecar"
BOTH = ("grafanaDashboard.enabled=true", "prometheusRule.enabled=true")

ALERTS = {
    "AuthSidecarRefreshFailuresRising",
    "AuthSidecarLostRotations",
    "AuthSidecarInvalidGrantRate",
    "AuthSidecarLockWaitAboveIdpTimeout",
    "AuthSidecarIdpTokenLatencyHigh",
    "AuthSidecarRedisUnavailable",
    "AuthSidecarHigh5xxRatio",
    "AuthSidecarReadinessFlapping",
}


def render(*sets: str) -> list[dict[str, Any]]:
    """`helm template` with `--set`s; `json:` marks a `--set-json` (helm's --set leaves 0.02
    a string, which the schema refuses as a ratio)."""
    args: list[str] = []
    for assignment in sets:
        json_value = assignment.removeprefix("json:")
        args += ["--set-json", json_value] if json_value != assignment else ["--set", assignment]
    text = run_helm("template", RELEASE, CHART, "--namespace", NAMESPACE, *args).stdout
    return [d for d in yaml.safe_load_all(text) if d is not None]


def only(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} {name} rendered"
    return found[0]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(*BOTH)


@pytest.fixture(scope="module")
def rule(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    return only(rendered, "PrometheusRule", FULLNAME)


@pytest.fixture(scope="module")
def dashboard(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = only(rendered, "ConfigMap", f"{FULLNAME}-dashboard")
    data: dict[str, Any] = json.loads(configmap["data"]["auth-sidecar.json"])
    return data


def alert_rules(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


# --- rendered only when enabled -----------------------------------------------------------


def observability_objects(docs: list[dict[str, Any]]) -> set[str]:
    found = {d["kind"] for d in docs if d["kind"] == "PrometheusRule"}
    if any(d["metadata"]["name"] == f"{FULLNAME}-dashboard" for d in docs):
        found.add("dashboard")
    return found


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ((), set()),
        (("grafanaDashboard.enabled=true",), {"dashboard"}),
        (("prometheusRule.enabled=true",), {"PrometheusRule"}),
        (BOTH, {"dashboard", "PrometheusRule"}),
        # In sidecar mode the app's pods are scraped all the same: both still apply.
        (("mode=sidecar", *BOTH), {"dashboard", "PrometheusRule"}),
    ],
    ids=["defaults", "dashboard", "rule", "both", "sidecar-mode"],
)
def test_rendered_only_when_enabled(sets: tuple[str, ...], expected: set[str]) -> None:
    assert observability_objects(render(*sets)) == expected


def test_dashboard_configmap_carries_the_grafana_label(rendered: list[dict[str, Any]]) -> None:
    """kube-prometheus-stack's Grafana sidecar loads ConfigMaps labelled grafana_dashboard=1;
    the data is the chart's dashboards/auth-sidecar.json, unchanged."""
    configmap = only(rendered, "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert configmap["data"]["auth-sidecar.json"] == DASHBOARD_FILE.read_text().rstrip("\n")


def test_dashboard_label_namespace_and_folder_are_configurable() -> None:
    docs = render(
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.label=dashboards.example.com/grafana",
        "grafanaDashboard.labelValue=auth",
        "grafanaDashboard.namespace=monitoring",
        "grafanaDashboard.annotations.grafana_folder=Auth",
    )
    meta = only(docs, "ConfigMap", f"{FULLNAME}-dashboard")["metadata"]
    assert meta["labels"]["dashboards.example.com/grafana"] == "auth"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["namespace"] == "monitoring"
    assert meta["annotations"] == {"grafana_folder": "Auth"}


# --- the dashboard ------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [p for p in found if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_dashboard_picks_its_data_source_from_a_variable(dashboard: dict[str, Any]) -> None:
    """No data source is hard-coded: each panel and query names `${datasource}`, a variable of
    type datasource over Prometheus data sources."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    by_variable = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(dashboard):
        assert panel["datasource"] == by_variable, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == by_variable, panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == by_variable
    uids = re.findall(r'"uid":\s*"([^"]*)"', json.dumps(dashboard))
    assert set(uids) == {"auth-sidecar", "${datasource}"}  # the dashboard's own uid, and that


def test_dashboard_layout(dashboard: dict[str, Any]) -> None:
    """Unique panel ids, panels inside Grafana's 24-column grid, and a panel per topic."""
    every = [p for p in dashboard["panels"]]
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    text = "\n".join(queries(dashboard))
    for needle in (
        "sidecar_http_requests_total",
        'status=~"5.."',
        "sidecar_http_request_duration_seconds_bucket",
        "sidecar_refresh_total",
        'outcome=~"invalid_grant_.*"',
        "sidecar_refresh_lock_wait_seconds_bucket",
        "sidecar_idp_token_request_duration_seconds_bucket",
        "sidecar_refresh_singleflight_joins_total",
        "sidecar_refresh_lock_contention_total",
        "sidecar_session_cache_live",
        "sidecar_logout_total",
        "sidecar_backchannel_rejected_total",
        "sidecar_idp_breaker_open",
        "sidecar_idp_breaker_transitions_total",
        "sidecar_dependency_up",
        "sidecar_ready",
        "sidecar_readiness_transitions_total",
    ):
        assert needle in text, needle


_METRIC = re.compile(r"\bsidecar_[a-z0-9_]+")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_names(exposition: str) -> set[str]:
    """Every series name `/metrics` can carry: each sample's, and for each declared family
    the names its type gives (a labelled counter has no sample before its first event)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ())}
    return names


async def test_every_queried_metric_is_exported(
    start_sidecar: StartSidecar,
    redis_prefix: str,
    dashboard: dict[str, Any],
    rule: dict[str, Any],
    http: aiohttp.ClientSession,
) -> None:
    """Each metric the dashboard or an alert queries is in /metrics of a running sidecar with
    the Redis store: a renamed metric would leave a panel empty and an alert silent."""
    sidecar = await start_sidecar(make_config(**store_sections("redis", redis_prefix)))
    await ready(sidecar)
    async with http.get(sidecar.url("/oauth2/userinfo")) as response:
        assert response.status == 401
    async with http.get(sidecar.management_url("/metrics")) as response:
        exposition = await response.text()
    exported = exported_names(exposition)
    expressions = queries(dashboard) + [r["expr"] for r in alert_rules(rule).values()]
    used = {name for expr in expressions for name in _METRIC.findall(expr)}
    assert len(used) >= 15
    assert sorted(used - exported) == []
    # What the alerts need before any event: the series exist, at their resting values.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }
    assert samples[("sidecar_dependency_up", (("dependency", "redis"),))] == 1
    assert samples[("sidecar_ready", ())] == 1
    assert samples[("sidecar_readiness_transitions_total", ())] == 0  # start-up is no flap
    for outcome in Outcome:
        assert samples[("sidecar_refresh_total", (("outcome", outcome.value),))] == 0


# --- the alerts -----------------------------------------------------------------------------


def test_the_rule_holds_every_alert(rule: dict[str, Any]) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert set(alert_rules(rule)) == ALERTS


def test_promtool_check_rules(rule: dict[str, Any], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    checked = run_promtool("check", "rules", rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def with_labels(template: str, labels: dict[str, str]) -> str:
    """An annotation as Prometheus expands it, for the annotations that use only $labels."""
    expanded = re.sub(
        r"\{\{\s*\$labels\.([a-z_]+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template
    )
    assert "{{" not in expanded, f"annotation with more than $labels: {template}"
    return expanded


def unit_tests(rule: dict[str, Any]) -> dict[str, Any]:
    """alerts_test.yaml, with each expected alert's annotations filled in where it gives none."""
    tests: dict[str, Any] = yaml.safe_load(UNIT_TESTS.read_text())
    rules = alert_rules(rule)
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            for alert in case["exp_alerts"]:
                if "exp_annotations" not in alert:
                    annotations = rules[case["alertname"]]["annotations"]
                    alert["exp_annotations"] = {
                        k: with_labels(v, alert["exp_labels"]) for k, v in annotations.items()
                    }
    return tests


def test_promtool_unit_tests_pass(rule: dict[str, Any], tmp_path: Path) -> None:
    """The shipped rules, exactly as rendered, against alerts_test.yaml."""
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False)
    )
    tests = tmp_path / "alerts_test.yaml"
    tests.write_text(yaml.safe_dump(unit_tests(rule), sort_keys=False, allow_unicode=True))
    result = run_promtool("test", "rules", tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent(rule: dict[str, Any]) -> None:
    """Each alert has a case where it fires and one where it must not."""
    fires: set[str] = set()
    silent: set[str] = set()
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    assert fires == silent == set(alert_rules(rule))


def test_refresh_outcomes_named_by_the_rules_exist(rule: dict[str, Any]) -> None:
    """A renamed outcome would silently turn a failure into a success, or the reverse."""
    named: set[str] = set()
    for alert in alert_rules(rule).values():
        for matcher in re.findall(r'outcome[!=]~?"([^"]+)"', alert["expr"]):
            named |= set(matcher.split("|"))
    named.discard("invalid_grant_.*")
    assert named and named <= {o.value for o in Outcome}


def threshold(rule: dict[str, Any], alert: str) -> str:
    expr: str = alert_rules(rule)[alert]["expr"]
    return expr.rsplit(">", 1)[1].strip()


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ((), f"{RefreshConfig().idp_timeout:g}"),  # the sidecar's default idp_timeout
        (("config.refresh.idp_timeout=4s",), "4"),
        (("config.refresh.idp_timeout=1m30s",), "90"),
        (("config.refresh.idp_timeout=2500ms",), "2.5"),
        (
            ("config.refresh.idp_timeout=4s", "prometheusRule.alerts.lockWait.thresholdSeconds=7"),
            "7",
        ),
    ],
    ids=["default", "4s", "1m30s", "2500ms", "explicit"],
)
def test_lock_wait_threshold_is_the_idp_timeout(sets: tuple[str, ...], expected: str) -> None:
    docs = render("prometheusRule.enabled=true", *sets)
    rule = only(docs, "PrometheusRule", FULLNAME)
    assert threshold(rule, "AuthSidecarLockWaitAboveIdpTimeout") == expected


def test_thresholds_labels_and_selector_come_from_values() -> None:
    docs = render(
        "prometheusRule.enabled=true",
        "prometheusRule.labels.release=prometheus",
        "prometheusRule.ruleLabels.team=auth",
        'prometheusRule.selector=job="myapp"',
        "json:prometheusRule.alerts.http5xx.ratio=0.02",
        "prometheusRule.alerts.http5xx.for=3m",
        "prometheusRule.alerts.http5xx.severity=page",
        "prometheusRule.alerts.readinessFlapping.enabled=false",
    )
    rule = only(docs, "PrometheusRule", FULLNAME)
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    rules = alert_rules(rule)
    assert set(rules) == ALERTS - {"AuthSidecarReadinessFlapping"}
    for alert in rules.values():
        assert alert["labels"]["team"] == "auth"
        assert 'job="myapp"' in alert["expr"] and "app-auth-sidecar-metrics" not in alert["expr"]
    assert threshold(rule, "AuthSidecarHigh5xxRatio") == "0.02"
    assert rules["AuthSidecarHigh5xxRatio"]["for"] == "3m"
    assert rules["AuthSidecarHigh5xxRatio"]["labels"]["severity"] == "page"
    assert (
        "More than 2% of the requests"
        in rules["AuthSidecarHigh5xxRatio"]["annotations"]["description"]
    )


def test_default_selector_is_the_servicemonitors_job(rule: dict[str, Any]) -> None:
    """The rules watch the series the chart's ServiceMonitor scrapes, and no other release's."""
    docs = render("serviceMonitor.enabled=true")
    service = only(docs, "Service", f"{FULLNAME}-metrics")
    for alert in alert_rules(rule).values():
        assert f'job="{service["metadata"]["name"]}", namespace="{NAMESPACE}"' in alert["expr"]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_section(rule: dict[str, Any]) -> None:
    """runbook_url points at the alert's own section of docs/operations.md, which says what it
    means and what to do."""
    text = OPERATIONS.read_text()
    section = text.split("## Dashboard and alerts", 1)[1].split("\n## ", 1)[0]
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for name, alert in alert_rules(rule).items():
        url = alert["annotations"]["runbook_url"]
        assert url.startswith("https://github.com/auth-sidecar/auth-sidecar/blob/main/docs/")
        anchor = url.rsplit("#", 1)[1]
        assert anchor in anchors, name
        assert f"### {name}\n" in section, name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


# --- values, schema and lint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return validator_for(schema)(schema)


def with_override(path: str, value: Any) -> dict[str, Any]:
    values: dict[str, Any] = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text()))
    node = values
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return values


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("grafanaDashboard.enabled", True),
        ("grafanaDashboard.label", "example.com/dashboard"),
        ("grafanaDashboard.annotations", {"grafana_folder": "Auth"}),
        ("prometheusRule.labels", {"release": "prometheus"}),
        ("prometheusRule.ruleLabels", {"team": "auth"}),
        ("prometheusRule.alerts.http5xx.ratio", 0.01),
        ("prometheusRule.alerts.lockWait.thresholdSeconds", 12.5),
        ("prometheusRule.alerts.redisUnavailable.for", "1h30m"),
    ],
)
def test_schema_accepts(path: str, value: Any, validator: Any) -> None:
    assert list(validator.iter_errors(with_override(path, value))) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("grafanaDashboard.enabled", "yes"),
        ("grafanaDashboard.label", "not a label"),
        ("grafanaDashboard.labelValue", 1),
        ("grafanaDashboard.folder", "Auth"),
        ("prometheusRule.labels", {"release": 1}),
        ("prometheusRule.alerts.http5xx.ratio", 5),
        ("prometheusRule.alerts.http5xx.ratio", 0),
        ("prometheusRule.alerts.http5xx.for", "10 minutes"),
        ("prometheusRule.alerts.lockWait.thresholdSeconds", -1),
        ("prometheusRule.alerts.readinessFlapping.transitions", 2.5),
        ("prometheusRule.alerts.sessionsLost", {"enabled": True}),
        ("prometheusRule.runbookUrl", "docs/operations.md"),
    ],
)
def test_schema_refuses(path: str, value: Any, validator: Any) -> None:
    assert list(validator.iter_errors(with_override(path, value)))


def test_helm_refuses_a_bad_threshold() -> None:
    args = ("template", RELEASE, CHART, "--set", "prometheusRule.alerts.http5xx.ratio=5")
    result = run_helm(*args, check=False)
    assert result.returncode != 0 and "ratio" in result.stderr, result.stderr


def test_helm_refuses_an_unreadable_idp_timeout() -> None:
    sets = ("--set", "prometheusRule.enabled=true", "--set", "config.refresh.idp_timeout=soon")
    result = run_helm("template", RELEASE, CHART, *sets, check=False)
    assert result.returncode != 0 and "thresholdSeconds" in result.stderr, result.stderr


def test_helm_lint_with_both_enabled() -> None:
    sets = [a for s in BOTH for a in ("--set", s)]
    out = run_helm("lint", "--strict", CHART, *sets).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out, out


def test_readme_and_values_document_the_switches() -> None:
    readme = (CHART / "README.md").read_text()
    for key in ("grafanaDashboard.enabled", "prometheusRule.enabled", "prometheusRule.alerts"):
        assert f"`{key}" in readme, key
