#!/usr/bin/env python3
"""Semantic checks of rendered Kubernetes manifests, the mistakes a schema cannot see.

    kubectl kustomize k8s/overlays/prod | python3 scripts/k8s_semantic.py -
    python3 scripts/k8s_semantic.py rendered.yaml [more.yaml …] [--external Secret/name …]

All files together form one set of objects (so a ServiceMonitor rendered from k8s/monitoring
can be checked against an overlay's Services). Checked, per namespace:

- workloads (Deployment, StatefulSet, DaemonSet): the selector matches the pod template's
  labels; volume mounts name volumes of the pod (or volumeClaimTemplates); probe ports exist
  on the container;
- a StatefulSet's serviceName is a headless Service that selects its pods;
- Services select the pods of some workload, and each targetPort is a port of those pods;
- ConfigMaps and Secrets referenced by volumes, envFrom and env exist (unless optional, or
  named with --external for objects created outside the manifests, like key Secrets);
- HorizontalPodAutoscalers and PodDisruptionBudgets target existing workloads;
- Ingress backends name an existing Service and one of its ports;
- NetworkPolicies select some pods, and their pod peers (without a namespaceSelector) too;
- ServiceMonitors select a Service and name its ports.

Exits 1 and prints one line per problem if anything is wrong; 0 otherwise. Needs PyYAML.
"""

import argparse
import sys

import yaml

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def ns(obj):
    return obj.get("metadata", {}).get("namespace", "")


def name(obj):
    return obj.get("metadata", {}).get("name", "")


def ref(obj):
    return f"{obj.get('kind')}/{name(obj)}"


def selects(selector, labels):
    """Whether a label selector (matchLabels + matchExpressions) selects `labels`."""
    if selector is None:
        return False
    match_labels = selector.get("matchLabels") or {}
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def is_empty_selector(selector):
    return not (selector or {}).get("matchLabels") and not (selector or {}).get("matchExpressions")


class Checker:
    def __init__(self, docs, external):
        self.docs = [d for d in docs if isinstance(d, dict) and d.get("kind")]
        self.external = set(external)
        self.problems = []

    def fail(self, obj, text):
        where = f"{ns(obj)}/" if ns(obj) else ""
        self.problems.append(f"{where}{ref(obj)}: {text}")

    def of_kind(self, *kinds):
        return [d for d in self.docs if d.get("kind") in kinds]

    def exists(self, kind, namespace, obj_name):
        if f"{kind}/{obj_name}" in self.external:
            return True
        return any(
            d.get("kind") == kind and name(d) == obj_name and ns(d) == namespace for d in self.docs
        )

    def pods(self, namespace):
        """(workload, pod template) of each workload in the namespace."""
        for w in self.of_kind(*WORKLOADS):
            if ns(w) == namespace:
                yield w, w.get("spec", {}).get("template", {})

    def selected_pods(self, namespace, selector=None, labels=None):
        out = []
        for w, template in self.pods(namespace):
            pod_labels = template.get("metadata", {}).get("labels") or {}
            if selector is not None and selects(selector, pod_labels):
                out.append((w, template))
            elif labels is not None and labels and all(
                pod_labels.get(k) == v for k, v in labels.items()
            ):
                out.append((w, template))
        return out

    def run(self):
        for w in self.of_kind(*WORKLOADS):
            self.check_workload(w)
        for s in self.of_kind("Service"):
            self.check_service(s)
        for h in self.of_kind("HorizontalPodAutoscaler"):
            self.check_hpa(h)
        for p in self.of_kind("PodDisruptionBudget"):
            if not self.selected_pods(ns(p), selector=p.get("spec", {}).get("selector")):
                self.fail(p, "its selector matches the pods of no workload")
        for i in self.of_kind("Ingress"):
            self.check_ingress(i)
        for n in self.of_kind("NetworkPolicy"):
            self.check_network_policy(n)
        for m in self.of_kind("ServiceMonitor"):
            self.check_service_monitor(m)
        return self.problems

    def check_workload(self, w):
        spec = w.get("spec", {})
        template = spec.get("template", {})
        labels = template.get("metadata", {}).get("labels") or {}
        selector = spec.get("selector")
        if w.get("kind") != "Job":
            if is_empty_selector(selector):
                self.fail(w, "has no selector")
            elif not selects(selector, labels):
                self.fail(w, f"selector {selector} does not match its template labels {labels}")
        pod = template.get("spec", {})
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        claims = {name(c) for c in spec.get("volumeClaimTemplates") or []}
        for v in volumes.values():
            self.check_volume_refs(w, v)
        if w.get("kind") == "StatefulSet":
            service = spec.get("serviceName")
            matches = [
                s
                for s in self.of_kind("Service")
                if name(s) == service and ns(s) == ns(w)
            ]
            if not service or not matches:
                self.fail(w, f"serviceName {service!r} is not a Service")
            else:
                s = matches[0]
                if s.get("spec", {}).get("clusterIP") != "None":
                    self.fail(w, f"serviceName {service!r} is not headless")
                sel = s.get("spec", {}).get("selector") or {}
                if not sel or any(labels.get(k) != v for k, v in sel.items()):
                    self.fail(w, f"serviceName {service!r} does not select its pods")
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            cname = c.get("name")
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes and m.get("name") not in claims:
                    self.fail(w, f"container {cname} mounts unknown volume {m.get('name')!r}")
            for src in c.get("envFrom") or []:
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    r = src.get(key)
                    if r and not r.get("optional") and not self.exists(kind, ns(w), r.get("name")):
                        self.fail(w, f"container {cname} envFrom: no {kind} {r.get('name')!r}")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    r = vf.get(key)
                    if r and not r.get("optional") and not self.exists(kind, ns(w), r.get("name")):
                        self.fail(w, f"container {cname} env {e.get('name')}: no {kind} {r.get('name')!r}")
            ports = c.get("ports") or []
            names = {p.get("name") for p in ports if p.get("name")}
            numbers = {p.get("containerPort") for p in ports}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe) or {}
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in p:
                        port = p[handler].get("port")
                        if port not in names and port not in numbers:
                            self.fail(w, f"container {cname} {probe} port {port!r} is not a container port")

    def check_volume_refs(self, w, volume):
        sources = []
        if "configMap" in volume:
            sources.append(("ConfigMap", volume["configMap"].get("name"), volume["configMap"]))
        if "secret" in volume:
            sources.append(("Secret", volume["secret"].get("secretName"), volume["secret"]))
        for s in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in s:
                sources.append(("ConfigMap", s["configMap"].get("name"), s["configMap"]))
            if "secret" in s:
                sources.append(("Secret", s["secret"].get("name"), s["secret"]))
        for kind, obj_name, spec in sources:
            if not spec.get("optional") and not self.exists(kind, ns(w), obj_name):
                self.fail(w, f"volume {volume.get('name')!r}: no {kind} {obj_name!r}")

    def check_service(self, s):
        spec = s.get("spec", {})
        if spec.get("type") == "ExternalName":
            return
        selector = spec.get("selector") or {}
        if not selector:
            self.fail(s, "has no selector")
            return
        pods = self.selected_pods(ns(s), labels=selector)
        if not pods:
            self.fail(s, f"selector {selector} matches the pods of no workload")
            return
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for w, template in pods:
                containers = template.get("spec", {}).get("containers") or []
                cports = [p for c in containers for p in c.get("ports") or []]
                if not any(target in (p.get("name"), p.get("containerPort")) for p in cports):
                    self.fail(s, f"port {port.get('name') or port.get('port')}: targetPort {target!r} is not a port of {ref(w)}")

    def check_hpa(self, h):
        target = h.get("spec", {}).get("scaleTargetRef") or {}
        if not self.exists(target.get("kind"), ns(h), target.get("name")):
            self.fail(h, f"scaleTargetRef {target.get('kind')}/{target.get('name')} does not exist")

    def service_port(self, namespace, service, port):
        for s in self.of_kind("Service"):
            if name(s) == service and ns(s) == namespace:
                ports = s.get("spec", {}).get("ports") or []
                return any(port in (p.get("name"), p.get("port")) for p in ports)
        return None

    def check_ingress(self, i):
        spec = i.get("spec", {})
        backends = [spec["defaultBackend"]] if "defaultBackend" in spec else []
        for rule in spec.get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backends.append(path.get("backend") or {})
        for b in backends:
            svc = b.get("service")
            if not svc:
                continue
            port = svc.get("port") or {}
            port = port.get("name", port.get("number"))
            found = self.service_port(ns(i), svc.get("name"), port)
            if found is None:
                self.fail(i, f"backend Service {svc.get('name')!r} does not exist")
            elif not found:
                self.fail(i, f"backend port {port!r} is not a port of Service {svc.get('name')!r}")

    def check_network_policy(self, n):
        spec = n.get("spec", {})
        selector = spec.get("podSelector")
        if not is_empty_selector(selector) and not self.selected_pods(ns(n), selector=selector):
            self.fail(n, "its podSelector matches the pods of no workload")
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(direction) or []:
                for peer in rule.get(key) or []:
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        sel = peer["podSelector"]
                        if not is_empty_selector(sel) and not self.selected_pods(ns(n), selector=sel):
                            self.fail(n, f"{direction} peer {sel} matches the pods of no workload")

    def check_service_monitor(self, m):
        spec = m.get("spec", {})
        namespaces = (spec.get("namespaceSelector") or {}).get("matchNames") or [ns(m)]
        services = [
            s
            for s in self.of_kind("Service")
            if ns(s) in namespaces and selects(spec.get("selector"), s.get("metadata", {}).get("labels") or {})
        ]
        if not any(self.of_kind("Service")):
            return  # rendered alone (k8s/monitoring): nothing to check against
        if not services:
            self.fail(m, "its selector matches no Service")
            return
        for endpoint in spec.get("endpoints") or []:
            port = endpoint.get("port")
            for s in services:
                if port and not any(p.get("name") == port for p in s.get("spec", {}).get("ports") or []):
                    self.fail(m, f"endpoint port {port!r} is not a port of Service {name(s)!r}")


def load(paths):
    docs = []
    for path in paths:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        docs.extend(yaml.safe_load_all(text))
    return docs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="rendered manifests ('-' for stdin)")
    parser.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="KIND/NAME",
        help="an object created outside the manifests (e.g. Secret/sealpost-keys)",
    )
    args = parser.parse_args(argv)
    problems = Checker(load(args.files), args.external).run()
    for p in problems:
        print(f"k8s_semantic: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
