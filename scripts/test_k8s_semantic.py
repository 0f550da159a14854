"""Tests of scripts/k8s_semantic.py: a consistent set of objects passes, and each kind of
broken copy fails with the problem named.

    python3 -m unittest discover -s scripts -p 'test_k8s_*.py'
"""

import copy
import os
import subprocess
import sys
import tempfile
import unittest

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k8s_semantic  # noqa: E402

GOOD = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: t}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, tier: front}}
    spec:
      containers:
        - name: web
          image: web
          ports: [{name: http, containerPort: 8080}]
          readinessProbe: {httpGet: {path: /readyz, port: http}}
          livenessProbe: {tcpSocket: {port: 8080}}
          envFrom: [{configMapRef: {name: web-env}}]
          volumeMounts: [{name: keys, mountPath: /keys}, {name: config, mountPath: /etc/web}]
      volumes:
        - {name: keys, secret: {secretName: web-keys}}
        - {name: config, configMap: {name: web-config}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: t}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
        - name: db
          image: db
          ports: [{name: client, containerPort: 4222}]
          volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
    - metadata: {name: data}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t, labels: {app: web}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: t}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: client, port: 4222, targetPort: 4222}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-env, namespace: t}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config, namespace: t}
---
apiVersion: v1
kind: Secret
metadata: {name: web-keys, namespace: t}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web, namespace: t}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: web, namespace: t}
spec:
  maxUnavailable: 1
  selector: {matchLabels: {app: web}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: t}
spec:
  rules:
    - http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: t}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: 4222}]
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: web, namespace: t}
spec:
  selector: {matchLabels: {app: web}}
  endpoints: [{port: http}]
"""


def good():
    return [d for d in yaml.safe_load_all(GOOD) if d]


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def problems(docs, external=()):
    return k8s_semantic.Checker(docs, external).run()


class SemanticCheck(unittest.TestCase):
    def assert_problem(self, docs, text):
        found = problems(docs)
        self.assertTrue(any(text in p for p in found), f"{text!r} not in {found}")

    def test_a_consistent_set_passes(self):
        self.assertEqual(problems(good()), [])

    def test_selector_not_matching_template_labels(self):
        docs = good()
        find(docs, "Deployment", "web")["spec"]["selector"]["matchLabels"]["app"] = "wbe"
        self.assert_problem(docs, "does not match its template labels")

    def test_service_selecting_no_pods(self):
        docs = good()
        find(docs, "Service", "web")["spec"]["selector"] = {"app": "nothing"}
        self.assert_problem(docs, "matches the pods of no workload")

    def test_service_target_port_missing(self):
        docs = good()
        find(docs, "Service", "web")["spec"]["ports"][0]["targetPort"] = "htp"
        self.assert_problem(docs, "targetPort 'htp' is not a port")

    def test_statefulset_service_name_missing_or_not_headless(self):
        docs = good()
        find(docs, "StatefulSet", "db")["spec"]["serviceName"] = "db-headless"
        self.assert_problem(docs, "serviceName 'db-headless' is not a Service")
        docs = good()
        del find(docs, "Service", "db")["spec"]["clusterIP"]
        self.assert_problem(docs, "is not headless")

    def test_hpa_and_pdb_targets(self):
        docs = good()
        find(docs, "HorizontalPodAutoscaler", "web")["spec"]["scaleTargetRef"]["kind"] = "StatefulSet"
        self.assert_problem(docs, "scaleTargetRef StatefulSet/web does not exist")
        docs = good()
        find(docs, "PodDisruptionBudget", "web")["spec"]["selector"]["matchLabels"] = {"app": "x"}
        self.assert_problem(docs, "PodDisruptionBudget/web: its selector matches the pods of no workload")

    def test_probe_port_missing(self):
        docs = good()
        container = find(docs, "Deployment", "web")["spec"]["template"]["spec"]["containers"][0]
        container["readinessProbe"]["httpGet"]["port"] = "metrics"
        self.assert_problem(docs, "readinessProbe port 'metrics' is not a container port")

    def test_missing_secret_and_config_map(self):
        docs = [d for d in good() if d["kind"] != "Secret"]
        self.assert_problem(docs, "no Secret 'web-keys'")
        self.assertEqual(problems(docs, external=["Secret/web-keys"]), [])
        docs = [d for d in good() if d["metadata"]["name"] != "web-env"]
        self.assert_problem(docs, "envFrom: no ConfigMap 'web-env'")

    def test_unknown_volume_mount(self):
        docs = good()
        find(docs, "StatefulSet", "db")["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] = "store"
        self.assert_problem(docs, "mounts unknown volume 'data'")

    def test_ingress_backend(self):
        docs = good()
        backend = find(docs, "Ingress", "web")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
        broken = copy.deepcopy(docs)
        backend["service"]["port"] = {"name": "https"}
        self.assert_problem(docs, "backend port 'https' is not a port of Service 'web'")
        find(broken, "Ingress", "web")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] = "api"
        self.assert_problem(broken, "backend Service 'api' does not exist")

    def test_network_policy_peers(self):
        docs = good()
        find(docs, "NetworkPolicy", "db")["spec"]["ingress"][0]["from"][0]["podSelector"] = {
            "matchLabels": {"app": "wen"}
        }
        self.assert_problem(docs, "ingress peer")

    def test_service_monitor_port(self):
        docs = good()
        find(docs, "ServiceMonitor", "web")["spec"]["endpoints"][0]["port"] = "metrics"
        self.assert_problem(docs, "endpoint port 'metrics' is not a port of Service 'web'")

    def test_the_command_exits_non_zero_on_a_broken_copy(self):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "k8s_semantic.py")
        docs = good()
        with tempfile.TemporaryDirectory() as tmp:
            ok = os.path.join(tmp, "good.yaml")
            bad = os.path.join(tmp, "broken.yaml")
            with open(ok, "w", encoding="utf-8") as f:
                yaml.safe_dump_all(docs, f)
            find(docs, "Service", "web")["spec"]["ports"][0]["targetPort"] = 9999
            with open(bad, "w", encoding="utf-8") as f:
                yaml.safe_dump_all(docs, f)
            run = lambda path: subprocess.run(
                [sys.executable, script, path], capture_output=True, text=True
            )
            self.assertEqual(run(ok).returncode, 0)
            broken = run(bad)
            self.assertEqual(broken.returncode, 1)
            self.assertIn("targetPort 9999", broken.stderr)


if __name__ == "__main__":
    unittest.main()
