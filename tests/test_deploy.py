"""The files under deploy/: valid, and naming only metrics the relay exports.

The exported names come from scraping a real collector (the relay's own plus
the process/platform ones), so a renamed metric breaks this test rather than
a dashboard panel or an alert in production.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Iterator, Set

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from firezone_relay.adapters.http import Readiness
from firezone_relay.adapters.metrics import make_registry
from tests.core.harness import make_relay
from tests.helpers import unavailable

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

#: Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
#: Metric-looking identifiers in PromQL: our prefixes, or a known Prometheus series.
_METRIC = re.compile(r"\b(?:relay|process|python)_[a-z0-9_]+\b|\bup\b")


def exported_names() -> Set[str]:
    """Every sample name a scrape can contain, including families without samples yet."""
    relay = make_relay(public_ip6="2001:db8::1")
    registry, _ = make_registry(relay, Readiness(relay))
    names: Set[str] = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode("utf-8")):
        suffixes = _SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL string of a Grafana dashboard: targets and query variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def metric_names(expr: str) -> Set[str]:
    # Drop label matchers and strings first: label values are not metrics.
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    return set(_METRIC.findall(expr))


class ExportedNamesTests(unittest.SynchronousTestCase):
    def test_spec_metrics_are_exported(self) -> None:
        names = exported_names()
        for name in (
            "relay_active_allocations",
            "relay_allocations_total",
            "relay_responses_total",
            "relay_channels_active",
            "relay_permissions_active",
            "relay_data_relayed_bytes_total",
            "relay_data_relayed_packets_total",
            "relay_dropped_packets_total",
            "relay_auth_failures_total",
            "relay_portal_connected",
            "relay_draining",
            "relay_ready",
            "relay_port_range_size",
            "relay_allocated_ports",
            "relay_packet_size_bytes_bucket",
            "relay_packet_size_bytes_sum",
            "relay_packet_size_bytes_count",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "python_info",
        ):
            self.assertIn(name, names)

    def test_metric_name_extraction(self) -> None:
        self.assertEqual(
            metric_names('sum by (relay_x) (rate(relay_a_total{reason!~"relay_b|c"}[5m])) / on(instance) up'),
            {"relay_a_total", "up"},
        )


class DashboardTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())

    def test_shape(self) -> None:
        d = self.dashboard
        self.assertEqual(d["uid"], "firezone-relay")
        self.assertIsInstance(d["schemaVersion"], int)
        ids = [p["id"] for p in d["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        variables = {v["name"] for v in d["templating"]["list"]}
        self.assertEqual(variables, {"datasource", "instance"})
        for panel in d["panels"]:
            self.assertTrue(panel["title"])
            grid = panel["gridPos"]
            self.assertLessEqual(grid["x"] + grid["w"], 24, panel["title"])
            if panel["type"] == "row":
                continue
            self.assertEqual(panel["datasource"]["uid"], "${datasource}")
            self.assertTrue(panel["targets"], panel["title"])
            for target in panel["targets"]:
                self.assertTrue(target["expr"].strip())
                self.assertIn('instance=~"$instance"', target["expr"], panel["title"])

    def test_only_exported_metrics(self) -> None:
        exported = exported_names()
        used: Set[str] = set()
        for expr in expressions(self.dashboard):
            used |= metric_names(expr)
        self.assertTrue(used)
        self.assertEqual(used - exported, set())
        # Every metric of SPEC §7 is on the dashboard somewhere.
        for name in ("relay_active_allocations", "relay_responses_total", "relay_dropped_packets_total",
                     "relay_auth_failures_total", "relay_data_relayed_bytes_total", "relay_packet_size_bytes_bucket",
                     "relay_portal_connected", "relay_draining", "relay_channels_active", "relay_permissions_active"):
            self.assertIn(name, used)


class AlertTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.path = DEPLOY / "prometheus-alerts.yml"
        self.rules = yaml.safe_load(self.path.read_text())

    def test_shape(self) -> None:
        rules = [rule for group in self.rules["groups"] for rule in group["rules"]]
        names = {rule["alert"] for rule in rules}
        self.assertLessEqual(
            {"RelayDown", "RelayNotReady", "RelayPortRangeNearlyExhausted", "RelayAuthFailureSpike"}, names
        )
        for rule in rules:
            self.assertIn(rule["labels"]["severity"], ("critical", "warning", "info"))
            self.assertTrue(rule["annotations"]["summary"])
            self.assertRegex(rule["for"], r"^\d+[smh]$")

    def test_only_exported_metrics(self) -> None:
        exported = exported_names() | PROMETHEUS_SERIES
        for group in self.rules["groups"]:
            for rule in group["rules"]:
                used = metric_names(rule["expr"])
                self.assertTrue(used, rule["alert"])
                self.assertEqual(used - exported, set(), rule["alert"])

    def test_promtool(self) -> None:
        """``promtool check rules`` and a unit test of the thresholds, where promtool is installed."""
        promtool = shutil.which("promtool")
        if promtool is None:
            # scripts/test.sh installs it; in CI its absence is a failure, not a skip.
            unavailable(self, "promtool is not installed (Debian: apt-get install prometheus; scripts/test.sh does)")
        result = subprocess.run([promtool, "check", "rules", str(self.path)], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        tests = Path(self.mktemp())
        tests.mkdir()
        # Annotations are checked by promtool above; the unit test is about when rules fire.
        for group in self.rules["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        (tests / "alerts.yml").write_text(yaml.safe_dump(self.rules))
        (tests / "test.yml").write_text(textwrap.dedent(PROMTOOL_TESTS))
        result = subprocess.run(
            [promtool, "test", "rules", "test.yml"], cwd=tests, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


PROMTOOL_TESTS = """\
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="firezone-relay", instance="a"}'
        values: '1 0 0 0'
      - series: 'relay_allocated_ports{instance="a"}'
        values: '15000x10'
      - series: 'relay_port_range_size{instance="a"}'
        values: '16384x10'
      - series: 'relay_allocated_ports{instance="b"}'
        values: '100x10'
      - series: 'relay_port_range_size{instance="b"}'
        values: '16384x10'
      - series: 'relay_ready{instance="a"}'
        values: '0x10'
      - series: 'relay_draining{instance="a"}'
        values: '0x10'
      - series: 'relay_ready{instance="b"}'
        values: '0x10'
      - series: 'relay_draining{instance="b"}'
        values: '1x10'
      - series: 'relay_auth_failures_total{instance="a", reason="bad_integrity"}'
        values: '0+600x30'
      - series: 'relay_auth_failures_total{instance="b", reason="missing_credentials"}'
        values: '0+6000x30'
    alert_rule_test:
      - eval_time: 3m
        alertname: RelayDown
        exp_alerts:
          - exp_labels: {severity: critical, job: firezone-relay, instance: a}
      - eval_time: 6m
        alertname: RelayPortRangeNearlyExhausted
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 6m
        alertname: RelayNotReady
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 20m
        alertname: RelayAuthFailureSpike
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
"""


class SystemdUnitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string((DEPLOY / "firezone-relay.service").read_text())
        self.unit = parser

    def test_required_keys(self) -> None:
        service = self.unit["Service"]
        self.assertTrue(service["ExecStart"].endswith("twistd -n --pidfile= firezone-relay"))
        self.assertEqual(service["KillSignal"], "SIGTERM")
        self.assertEqual(service["Restart"], "on-failure")
        self.assertGreater(int(service["TimeoutStopSec"]), 600)  # longer than the example DRAIN_TIMEOUT
        self.assertTrue(service["EnvironmentFile"])
        self.assertEqual(service["NoNewPrivileges"], "yes")
        self.assertEqual(service["ProtectSystem"], "strict")
        self.assertEqual(service["AmbientCapabilities"], "")  # no port below 1024 by default
        self.assertIn("network-online.target", self.unit["Unit"]["After"])
        self.assertEqual(self.unit["Install"]["WantedBy"], "multi-user.target")

    def test_systemd_analyze(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        tmp = Path(self.mktemp())
        tmp.mkdir()
        unit = tmp / "firezone-relay.service"
        unit.write_text((DEPLOY / "firezone-relay.service").read_text())
        result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        # The venv path does not exist here; anything else is a real error.
        problems = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.strip() and "is not executable" not in line and "No such file" not in line
        ]
        self.assertEqual(problems, [])


class ExampleConfigTests(unittest.TestCase):
    """deploy/firezone-relay.toml parses as the relay reads it, and every
    commented-out key in it is a flag too."""

    def test_the_example_config_parses(self) -> None:
        from firezone_relay import tap

        path = DEPLOY / "firezone-relay.toml"
        options = tap.Options(environ={})
        options.parseOptions(["--config", str(path)])
        self.assertEqual(options["public-ip4-addr"], "203.0.113.7")
        self.assertEqual(options["control-endpoint"], ("127.0.0.1", 9999))
        self.assertEqual(options["rest-auth-secret"], ())  # commented out: no secret anyone can copy
        self.assertEqual(options["health-check-addr"], ("127.0.0.1", 8080))
        flags = {entry[0] for entry in tap.Options.optParameters} | {entry[0] for entry in tap.Options.optFlags}
        flags |= {"allow-peer", "deny-peer", "rest-auth-secret"}
        commented = re.findall(r"^# ?([a-z0-9-]+) = ", path.read_text(), re.M)
        self.assertTrue(commented)
        self.assertEqual([key for key in commented if key not in flags], [])
