#!/usr/bin/env python3
"""Writes k8s/monitoring/prometheusrule.yaml from deploy/prometheus/alerts.yml.

alerts.yml is the source of truth (checked with `promtool check rules` and
`promtool test rules`); the PrometheusRule carries the same groups for the Prometheus
Operator. Run from the repository root after editing alerts.yml:

    python3 deploy/prometheus/to-prometheusrule.py          # write
    python3 deploy/prometheus/to-prometheusrule.py --check  # exit 1 if out of date

Needs PyYAML.
"""

import sys

import yaml

SOURCE = "deploy/prometheus/alerts.yml"
TARGET = "k8s/monitoring/prometheusrule.yaml"
HEADER = (
    "# GENERATED from deploy/prometheus/alerts.yml by deploy/prometheus/to-prometheusrule.py;\n"
    "# edit alerts.yml and rerun the script instead of editing this file.\n"
    "# Its labels must match your Prometheus' ruleSelector (e.g. release: kube-prometheus-stack).\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render():
    with open(SOURCE, encoding="utf-8") as f:
        groups = yaml.safe_load(f)["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "sealpost", "labels": {"app.kubernetes.io/name": "sealpost"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def main():
    text = render()
    if "--check" in sys.argv[1:]:
        try:
            with open(TARGET, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{TARGET} is out of date: run python3 {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    with open(TARGET, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
