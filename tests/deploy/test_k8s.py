"""deploy/k8s: every overlay renders (kubectl kustomize, or the pure-Python fallback, which must
agree with kubectl where both exist), every document is schema-valid (kubernetes-validate,
strict, bundled schemas: offline), and the manifests agree with the server they deploy.

The live-server checks start the real server on the tiny random model: each probe path answers
as its probe expects in each state (loading, serving, draining, engine dead), the metrics the
autoscalers read are ones /metrics exports, and the container's arguments parse with the real CLI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from specdec.core.config import load
from tests.deploy.kustomize_lite import render as lite_render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
# Oldest API the kit targets (preStop `sleep` is beta, on by default, from 1.30) and the newest
# schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "latest")
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}
CONTAINER = "specdec"


def _kubectl() -> str | None:
    return shutil.which("kubectl")


def kubectl_render(directory: Path) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_key(docs: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(keyed) == len(docs), "two documents share a kind and name"
    return keyed


_RENDERED: dict[str, list[dict]] = {}


def rendered(overlay: str) -> dict[tuple[str, str], dict]:
    """The overlay's documents: kubectl's rendering where installed, else the fallback's."""
    if overlay not in _RENDERED:
        directory = K8S / "overlays" / overlay
        _RENDERED[overlay] = kubectl_render(directory) if _kubectl() else lite_render(directory)
    return by_key(_RENDERED[overlay])


def one(docs: dict, kind: str) -> dict:
    found = [d for (k, _), d in docs.items() if k == kind]
    assert len(found) == 1, f"{len(found)} {kind} documents"
    return found[0]


def container(docs: dict) -> dict:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == CONTAINER)


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def server_config(docs: dict, tmp_path: Path, overrides: dict | None = None):
    """The ConfigMap's TOML, loaded by the server's own config loader."""
    path = tmp_path / "config.toml"
    path.write_text(one(docs, "ConfigMap")["data"]["config.toml"])
    return load(path, overrides)


def prestop_seconds(c: dict) -> int:
    pre = c["lifecycle"]["preStop"]
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


# ------------------------------------------------------------------------ rendering

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fallback_renders_like_kubectl(overlay):
    lite = by_key(lite_render(K8S / "overlays" / overlay))
    assert ("Deployment", "specdec") in lite
    if not _kubectl():
        pytest.skip("kubectl is not installed: the fallback rendering is checked on its own")
    assert lite == by_key(kubectl_render(K8S / "overlays" / overlay))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_documents_pass_kubernetes_validate(overlay, version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    checked = 0
    for (kind, name), doc in rendered(overlay).items():
        if kind in CRD_KINDS:
            continue  # no bundled schema; test_crds checks their shape
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 4  # ConfigMap, Deployment, Service, PDB (+ the HPA unless KEDA)


def test_validation_can_fail():
    import kubernetes_validate

    doc = rendered("cpu")[("Deployment", "specdec")]
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


def test_crds():
    docs = rendered("gpu-keda")
    assert ("HorizontalPodAutoscaler", "specdec") not in docs, "KEDA replaces the HPA"
    scaled = one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert {t["type"] for t in scaled["spec"]["triggers"]} == {"prometheus"}
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics"
               for e in monitor["spec"]["endpoints"])


# ------------------------------------------------------------------------ invariants

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_labels_selectors_and_images(overlay):
    docs = rendered(overlay)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= \
        pod_labels.items()
    if ("HorizontalPodAutoscaler", "specdec") in docs:
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    image = container(docs)["image"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    configmap = one(docs, "ConfigMap")["metadata"]["name"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("configMap", {}).get("name") == configmap for v in volumes)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_threads_secret_and_config(overlay, tmp_path, monkeypatch):
    docs = rendered(overlay)
    c = container(docs)
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert requests == limits, "requests must equal limits (Guaranteed QoS, no CPU throttling)"
    env = env_of(c)
    threads = env["SPECDEC_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": CONTAINER, "resource": "limits.cpu", "divisor": "1"}
    secret = env["SPECDEC_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"]
    assert env["SPECDEC_MODEL_DIR"]["value"] == "/models"

    # The container's arguments, as the kubelet expands $(VAR), parse with the real CLI.
    from server.__main__ import build_config

    cpu_limit = math.ceil(float(limits["cpu"]))  # divisor 1 rounds up to whole cores
    expanded = {"SPECDEC_NUM_THREADS": str(cpu_limit)}
    args = [re.sub(r"\$\((\w+)\)", lambda m: expanded[m.group(1)], a) for a in c["args"]]
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
    config_arg = args[args.index("--config") + 1]
    assert Path(config_arg).parent == Path(mount)
    (tmp_path / Path(config_arg).name).write_text(one(docs, "ConfigMap")["data"]["config.toml"])
    args[args.index("--config") + 1] = str(tmp_path / Path(config_arg).name)
    monkeypatch.setenv("SPECDEC_API_KEY", "from-the-secret")
    config = build_config(args)
    assert config.device.num_threads == cpu_limit
    assert config.server.api_key == "from-the-secret"
    assert config.server.host == "0.0.0.0"
    port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
    assert config.server.port == port
    service_port = one(docs, "Service")["spec"]["ports"][0]
    assert service_port["targetPort"] in ("http", port)

    # The models the config names are ones `specdec fetch` knows (baked or on the volume).
    from specdec.fetch import KNOWN_MODELS
    assert config.model.path in KNOWN_MODELS
    assert config.spec.draft_model in (None, *KNOWN_MODELS)

    # Grace period: preStop sleep, then up to shutdown_timeout of draining, then a margin.
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.server.shutdown_timeout + prestop_seconds(c), \
        (grace, config.server.shutdown_timeout, prestop_seconds(c))


def test_gpu_overlay_requests_a_gpu(tmp_path):
    docs = rendered("gpu")
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    c = container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"].endswith(":cuda")
    assert server_config(docs, tmp_path).device.device == "cuda"
    cpu = rendered("cpu")
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
    assert container(cpu)["image"].endswith(":cpu")
    assert server_config(cpu, tmp_path).device.device == "cpu"


def test_probes_point_at_the_health_routes():
    for overlay in OVERLAYS:
        c = container(rendered(overlay))
        assert c["startupProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] == "http"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, \
            "the startup probe must allow minutes for model load and calibration"


# ------------------------------------------------------------------ against the server

def _adapter_rules() -> list[dict]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    return values["rules"]["custom"]


def _series_for(metric: str, exported: set[str]) -> list[str]:
    """Prometheus series that the adapter rules expose under the custom metric `metric`."""
    found = []
    for rule in _adapter_rules():
        pattern = rule["name"]["matches"]
        for series in exported:
            if re.fullmatch(pattern, series) and \
                    re.sub(pattern, rule["name"]["as"].replace("${", "\\g<").replace("}", ">"),
                           series) == metric:
                found.append(series)
    return found


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    from tests.e2e.conftest import LiveServer, make_config
    server = LiveServer(make_config(tiny_llama_dir, server={"served_model_name": "tiny-k8s"}))
    yield server.start()
    server.stop()


def _get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _exported(server) -> set[str]:
    status, body = _get(server.base_url + "/metrics")
    assert status == 200
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{| )", body.decode(),
                                            re.MULTILINE)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_metrics_are_exported(overlay, live):
    exported = _exported(live)
    docs = rendered(overlay)
    names = []
    for (kind, _), doc in docs.items():
        if kind == "HorizontalPodAutoscaler":
            for metric in doc["spec"]["metrics"]:
                assert metric["type"] == "Pods"
                name = metric["pods"]["metric"]["name"]
                assert _series_for(name, exported), \
                    f"HPA metric {name} maps to no series that /metrics exports"
                names.append(name)
        if kind == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                for series in re.findall(r"([a-zA-Z_:][\w:]*)\{", trigger["metadata"]["query"]):
                    assert series in exported, f"KEDA query reads {series}, not exported"
                    names.append(series)
    assert any("num_requests_waiting" in n for n in names), names


def test_adapter_rules_select_exported_series(live):
    exported = _exported(live)
    for rule in _adapter_rules():
        selected = [s for s in exported if re.fullmatch(rule["name"]["matches"], s)]
        assert {s.split(":", 1)[1] for s in selected} >= {"num_requests_waiting",
                                                          "num_requests_running"}, selected


def test_probe_paths_answer_as_their_probes_expect_when_serving(live):
    docs = rendered("cpu")
    c = container(docs)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        status, _ = _get(live.base_url + c[probe]["httpGet"]["path"])
        assert 200 <= status < 400, (probe, status)  # the kubelet's success range


class _DeadEngine:
    """A real engine whose step() raises once a request arrives: the engine thread dies."""

    def __init__(self, engine):
        self._engine = engine

    def step(self):
        raise RuntimeError("simulated engine crash")

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _statuses(app, paths: list[str], before=None) -> list[int]:
    """GET each path on `app` (one event loop for the app's whole life, on its own thread:
    Playwright may hold this thread's loop); `before(client)` runs first."""
    from aiohttp.test_utils import TestClient, TestServer

    async def go():
        async with TestClient(TestServer(app)) as client:
            if before is not None:
                await before(client)
            return [(await client.get(path)).status for path in paths]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def test_probe_paths_while_loading_draining_and_dead(tiny_llama_dir):
    from server.app import OpenAIServer
    from specdec.engine import Engine
    from tests.e2e.conftest import make_config

    c = container(rendered("cpu"))
    ready, live = c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]
    config = make_config(tiny_llama_dir)

    # Bound, engine not attached yet: startup/readiness wait, liveness does not restart it.
    assert _statuses(OpenAIServer(config).app, [ready, live]) == [503, 200]

    engine = Engine.from_config(config)
    draining = OpenAIServer(config)

    async def attach_and_drain(client):
        draining.attach(engine)
        assert (await client.get(ready)).status == 200
        draining.draining = True
    try:
        # Draining: out of the Service's endpoints, but not killed mid-drain.
        assert _statuses(draining.app, [ready, live], attach_and_drain) == [503, 200]
    finally:
        draining.close()

    dead = OpenAIServer(config)

    async def attach_and_crash(client):
        dead.attach(_DeadEngine(engine))
        await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        for _ in range(100):
            if not dead.bridge.alive:
                break
            await asyncio.sleep(0.05)
    try:
        # The engine thread died: liveness fails, so the kubelet restarts the container.
        assert _statuses(dead.app, [ready, live], attach_and_crash) == [503, 503]
    finally:
        dead.close()


def test_containerfile_cmd_parses_with_the_cli(tmp_path, monkeypatch):
    """The image's CMD (used when a pod gives no args) parses too, and the entrypoint is the
    `specdec serve` console script."""
    from server.__main__ import build_config
    from tests.deploy.test_containerfile import final_stage

    stage = final_stage()
    assert stage["ENTRYPOINT"] == ["specdec", "serve"]
    cmd = stage["CMD"]
    assert cmd[cmd.index("--config") + 1] == "/etc/specdec/config.toml"
    assert "deploy/config.toml /etc/specdec/config.toml" in stage["COPY"]
    baked = ROOT / "deploy" / "config.toml"
    base = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())["data"]["config.toml"]
    assert tomllib.loads(baked.read_text()) == tomllib.loads(base), \
        "deploy/config.toml and the base ConfigMap drifted apart"
    config_path = tmp_path / "config.toml"
    config_path.write_text(baked.read_text())
    cmd[cmd.index("--config") + 1] = str(config_path)
    monkeypatch.delenv("SPECDEC_API_KEY", raising=False)
    config = build_config(cmd)
    assert config.server.host == "0.0.0.0" and config.server.port == 8000

    setup = (ROOT / "setup.py").read_text()
    assert '"specdec=specdec.cli:main"' in setup
    import server.__main__ as serve_main
    from specdec import cli
    seen = []
    monkeypatch.setattr(serve_main, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["serve", *cmd]) == 0
    assert seen == [cmd]
    assert tomllib.loads(config_path.read_text())["server"]["port"] == 8000
