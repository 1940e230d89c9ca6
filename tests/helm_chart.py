"""Checks charts/kiln offline: lint, renders, schema validation, security policy, and assertions on the objects.

    python3 tests/helm_chart.py KILN_BINARY METRICS_FILE

KILN_BINARY: the built `kiln`, whose `serve --help` and `compile --help` the chart's arguments must match.
METRICS_FILE: a scrape of a running server's `/metrics`, whose series the HPA's metric must name.
Exits non-zero on the first failure; prints one line per check group. Needs `helm-python-sdk`,
`kubernetes-validate` and `checkov` (pip).
"""
import os
import re
import subprocess
import sys
import tempfile

import helm_python
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "charts", "kiln")
kiln, metrics_file = sys.argv[1], sys.argv[2]


def fail(what):
    print(f"FAILED: {what}", file=sys.stderr)
    sys.exit(1)


def check(cond, what):
    if not cond:
        fail(what)


def values_file(name):
    with open(os.path.join(CHART, name)) as f:
        return yaml.safe_load(f)


# The renders every check runs on: the defaults, each environment, and the GPU Deployment on.
RENDERS = {
    "default": {},
    "development": values_file("values-development.yaml"),
    "staging": values_file("values-staging.yaml"),
    "production": values_file("values-production.yaml"),
    "gpu": {"gpu": {"enabled": True}},
    "image": {"plans": {"source": "image"}},
}

# 1. Lint in strict mode (warnings are errors); only the informational "icon is recommended" may remain.
for name, values in RENDERS.items():
    report = helm_python.lint(CHART, values, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    check(not problems, f"lint {name}: {problems}")
print(f"lint: clean in strict mode for {', '.join(RENDERS)}")

chart = helm_python.Chart.load(CHART)
objects = {}
workdir = tempfile.mkdtemp(prefix="kiln-chart-")
for name, values in RENDERS.items():
    rendered = chart.render(values, name="kiln", namespace="kiln")
    text = "\n---\n".join(v for k, v in sorted(rendered.items()) if k.endswith(".yaml") and v.strip())
    with open(os.path.join(workdir, f"{name}.yaml"), "w") as f:
        f.write(text)
    objects[name] = [d for d in yaml.safe_load_all(text) if d]

# 2. Every render against the Kubernetes schemas, rejecting unknown fields. The ServiceMonitor is a CRD the
# offline schemas lack: reported as a warning, so the exit status still tells.
for name in RENDERS:
    path = os.path.join(workdir, f"{name}.yaml")
    run = subprocess.run(["kubernetes-validate", "--strict", "--quiet", path], capture_output=True, text=True)
    check(run.returncode == 0, f"kubernetes-validate {name}: {run.stdout}{run.stderr}")
print("kubernetes-validate --strict: every render passes")

# 3. checkov's Kubernetes policies: no failed check (skips carry their reason in the chart's annotations), and
# its Dockerfile policies on the image.
def checkov(framework, path):
    run = subprocess.run(
        ["checkov", "--framework", framework, "-f", path, "--compact", "--quiet", "--skip-download", "-o", "json"],
        capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    import json
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        fail(f"checkov {framework} {path}: no JSON report:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    check(not failed, f"checkov {path}: " + "; ".join(f"{c['check_id']} {c['resource']}" for c in failed))
    for r in reports:
        for c in r.get("results", {}).get("skipped_checks", []):
            check(c.get("suppress_comment"), f"checkov {path}: {c['check_id']} skipped without a reason")


for name in RENDERS:
    checkov("kubernetes", os.path.join(workdir, f"{name}.yaml"))
checkov("dockerfile", os.path.join(ROOT, "Dockerfile"))
print("checkov: no failed checks in any render or the Dockerfile")


# 4. Assertions on the objects.
def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs):
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in of_kind(docs, "Deployment")]


def containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


for name, docs in objects.items():
    deployments = of_kind(docs, "Deployment")
    check(deployments, f"{name}: no Deployment")
    for d in deployments:
        dep = d["metadata"]["name"]
        strategy = d["spec"]["strategy"]
        check(strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0,
              f"{name}/{dep}: rolling update with maxUnavailable 0")
        spec = d["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        check(pod["runAsNonRoot"] and pod["seccompProfile"]["type"] == "RuntimeDefault", f"{name}/{dep}: pod securityContext {pod}")
        check(spec["automountServiceAccountToken"] is False, f"{name}/{dep}: service account token mounted")
        for c in containers(spec):
            sc = c["securityContext"]
            check(sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
                  and sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault",
                  f"{name}/{dep}/{c['name']}: securityContext {sc}")
            check("command" not in c, f"{name}/{dep}/{c['name']}: overrides the image's entrypoint")
        # GPU limits exactly on the GPU Deployments, and only when enabled.
        server = spec["containers"][0]
        is_gpu = d["metadata"]["labels"]["kiln.dev/device"] == "gpu"
        check(("nvidia.com/gpu" in server["resources"]["limits"]) == is_gpu, f"{name}/{dep}: GPU limits {server['resources']}")
        check(not is_gpu or (spec["nodeSelector"] and spec["tolerations"]), f"{name}/{dep}: GPU pod without node selector or tolerations")
        # GPU pods serve on the GPU (no silent CPU fallback), from plans compiled with CUDA code.
        device = server["args"][server["args"].index("--device") + 1]
        check(device == ("cuda" if is_gpu else "cpu"), f"{name}/{dep}: --device {device}")
        for init in spec.get("initContainers", []):
            target = init["args"][init["args"].index("--target") + 1]
            check(("cuda" in target.split(",")) == is_gpu, f"{name}/{dep}: compiles --target {target}")
        # Probes on the server's own port: /health for startup and liveness, /ready for readiness.
        port = {p["name"]: p["containerPort"] for p in server["ports"]}
        args = server["args"]
        check(str(port["http"]) == args[args.index("--port") + 1], f"{name}/{dep}: http port {port} vs args {args}")
        check(str(port["metrics"]) == args[args.index("--metrics-port") + 1], f"{name}/{dep}: metrics port")
        for probe, path in [("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")]:
            get = server[probe]["httpGet"]
            check(get["path"] == path and get["port"] == "http", f"{name}/{dep}: {probe} {get}")
    gpu_deployments = [d for d in deployments if d["metadata"]["labels"]["kiln.dev/device"] == "gpu"]
    check(bool(gpu_deployments) == (name == "gpu"), f"{name}: GPU Deployments {[d['metadata']['name'] for d in gpu_deployments]}")
    # One PodDisruptionBudget per Deployment where enabled, and a NetworkPolicy.
    pdbs = {p["metadata"]["name"] for p in of_kind(docs, "PodDisruptionBudget")}
    if name != "development":
        check(pdbs == {d["metadata"]["name"] for d in deployments}, f"{name}: PDBs {pdbs}")
    check(len(of_kind(docs, "NetworkPolicy")) == 1, f"{name}: one NetworkPolicy")
print("objects: rolling updates, security contexts, GPU limits, probes, PDBs and network policy hold in every render")

# Model groups: their models and aliases reach the server's arguments, one Deployment and Service per group.
prod = objects["production"]
for group in RENDERS["production"]["modelGroups"]:
    dep = next(d for d in of_kind(prod, "Deployment") if d["metadata"]["labels"]["kiln.dev/group"] == group["name"])
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = {(args[i], args[i + 1]) for i in range(len(args) - 1)}
    for m in group["models"]:
        check(("--model", f"{m['name']}=/models/{m['plan']}") in pairs, f"group {group['name']}: model {m['name']} not in {args}")
    for alias, model in group["aliases"].items():
        check(("--alias", f"{alias}={model}") in pairs, f"group {group['name']}: alias {alias} not in {args}")
    service = next(s for s in of_kind(prod, "Service") if s["metadata"]["labels"]["kiln.dev/group"] == group["name"])
    selector = dep["spec"]["template"]["metadata"]["labels"]
    check(all(selector.get(k) == v for k, v in service["spec"]["selector"].items()), f"service of {group['name']} misses its pods")
check(("--api-key-file", "/etc/kiln/api-keys/api-keys") in pairs, "production reads its API keys from the Secret's file")
print("model groups: models and aliases reach each group's arguments; each Service selects its group")

# Plans compiled at start: the init container writes exactly the plan the server reads.
dev = of_kind(objects["development"], "Deployment")[0]["spec"]["template"]["spec"]
init = dev["initContainers"][0]["args"]
served = dev["containers"][0]["args"]
check(init[0] == "compile" and init[init.index("-o") + 1] in served[served.index("--model") + 1], f"compile {init} vs serve {served}")

# Plans baked into the image: read from plans.imagePath, no claim mounted.
img = of_kind(objects["image"], "Deployment")[0]["spec"]["template"]["spec"]
img_args = img["containers"][0]["args"]
check(img_args[img_args.index("--model") + 1] == "smollm2=/opt/kiln/plans/SmolLM2-135M-Instruct.Q4_1.plan", f"image plans: {img_args}")
check(all("persistentVolumeClaim" not in v for v in img["volumes"]), "image plans mount no claim")
print("plans: compiled at start by the init container the server reads from; baked into the image without a claim")

# 5. The chart cannot drift from the binary: every flag it passes is one `kiln serve --help` (or, for the init
# container, `kiln compile --help`) documents, and the image's entrypoint is kiln.
def documented_flags(command):
    text = subprocess.run([kiln, command, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text)) | set(re.findall(r"\s(-[a-z]),", text))


serve_flags, compile_flags = documented_flags("serve"), documented_flags("compile")
for name, docs in objects.items():
    for dep, spec in pod_specs(docs):
        for c in containers(spec):
            args = c["args"]
            flags = serve_flags if args[0] == "serve" else compile_flags
            check(args[0] in ("serve", "compile"), f"{name}/{dep}/{c['name']}: runs `kiln {args[0]}`")
            unknown = [a for a in args if a.startswith("-") and a not in flags]
            check(not unknown, f"{name}/{dep}/{c['name']}: flags {unknown} are not in `kiln {args[0]} --help`")
with open(os.path.join(ROOT, "Dockerfile")) as f:
    dockerfile = f.read()
entrypoints = re.findall(r'^ENTRYPOINT \["([^"]+)"\]', dockerfile, re.M)
check(entrypoints and all(e == "/usr/local/bin/kiln" for e in entrypoints), f"Dockerfile entrypoints {entrypoints}")
check(re.findall(r"^USER (\d+)", dockerfile, re.M) == [str(values_file("values.yaml")["runAsUser"])] * 2,
      "both images run as the chart's runAsUser")
print(f"arguments: every flag the chart passes is documented by `kiln serve/compile --help`; entrypoint {entrypoints[0]}")

# 6. The HPA scales on a series kiln exports, named as the custom metrics API exposes it.
with open(metrics_file) as f:
    exported = {line.split("{")[0].split(" ")[0] for line in f if line and not line.startswith("#")}
series = values_file("values.yaml")["autoscaling"]["requestsWaiting"]["series"]
check(series in exported, f"{series} is not among the exported series {sorted(exported)}")
for hpa in of_kind(prod, "HorizontalPodAutoscaler"):
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    check(names == [series.replace(":", "_")], f"HPA {hpa['metadata']['name']} metrics {names}")
    check(hpa["spec"]["scaleTargetRef"]["name"] == hpa["metadata"]["name"], "HPA targets its Deployment")
print(f"autoscaling: the HPAs scale on {series} (exported by /metrics) as {series.replace(':', '_')}")
print("all chart checks passed")
