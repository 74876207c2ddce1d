"""The deployment files in deploy/ agree with the worker and with each other.

deploy/systemd/engine-worker.service, deploy/docker/Dockerfile and
deploy/kubernetes/engine-worker.yaml each start ``engine-worker`` with
``--shutdown-timeout S`` and give it a stop deadline of their own
(TimeoutStopSec, terminationGracePeriodSeconds): a deadline not above S plus
the drain's fixed waits SIGKILLs a worker still draining. They also name the
same numbers twice (the Service port and ``--bind``, the probe port and
``--metrics-port``, the journal path and a volume), and nothing but a test
notices when one side changes.

Every ``engine-worker`` argument list is parsed by the real click command
(``worker_main.make_context``: options checked and converted, no worker
started), so a renamed or misspelled option fails here, and the values the
checks compare are the ones the worker would get. The files are read with the
parsers their tools resemble (configparser, JSON exec forms, PyYAML); no
process is started and no network used (a DNS answer is faked).
"""

from __future__ import annotations

import ast
import configparser
import json
import posixpath
import re
import shlex
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from engine import Engine
from engine.cli import find_app, worker_main
from engine.transport import discovery
from engine.worker.drain import TAKE_WAIT
from engine.worker.supervisor import FORWARD_FLUSH_TIMEOUT, STOP_GRACE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "engine-worker.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
MANIFEST = DEPLOY / "kubernetes" / "engine-worker.yaml"

#: What a draining worker may still wait for once --shutdown-timeout has run out: a client's
#: answer to tasks handed back, a child's exit after STOP, the hand-over of forwarded tasks.
DRAIN_TAIL = TAKE_WAIT + STOP_GRACE + FORWARD_FLUSH_TIMEOUT


def worker_params(args: list[str]) -> dict:
    """``engine-worker``'s parsed options for ``args``: a usage error (unknown option, bad value) fails the test."""
    ctx = worker_main.make_context("engine-worker", list(args), resilient_parsing=False)
    return ctx.params


def stop_deadline_floor(params: dict) -> float:
    """The least stop deadline that lets a worker started with ``params`` finish its drain."""
    assert params["shutdown_timeout"] is not None, "no --shutdown-timeout: a stop would run everything accepted first"
    return params["shutdown_timeout"] + DRAIN_TAIL


def port_of(endpoint: str) -> int:
    """The port of a ``tcp://HOST:PORT`` endpoint."""
    parts = urlsplit(endpoint)
    assert parts.scheme == "tcp" and parts.port is not None, endpoint
    return parts.port


# --- systemd -------------------------------------------------------------------------------------


def load_unit() -> configparser.SectionProxy:
    """The [Service] section of the unit, read as systemd would (case kept, ``\\`` continuations)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    return parser["Service"]


def unit_command(service: configparser.SectionProxy) -> list[str]:
    """ExecStart as an argument list: configparser keeps the ``\\``-newline continuations systemd joins."""
    return shlex.split(service["ExecStart"].replace("\\\n", " "))


def unit_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec)?", value.strip())
    assert match, f"write {value!r} as plain seconds"
    return float(match.group(1))


def test_the_systemd_unit_runs_a_real_engine_worker_command():
    service = load_unit()
    command = unit_command(service)
    assert command[0].startswith("/") and command[0].endswith("/engine-worker"), command[0]
    params = worker_params(command[1:])
    assert params["fair"] and params["concurrency"]
    assert params["metrics_port"] is not None
    # The journal on the state directory systemd creates and hands to the service's user.
    state_dir = posixpath.join("/var/lib", service["StateDirectory"])
    assert params["journal"] and posixpath.dirname(params["journal"]) == state_dir
    environment = dict(item.split("=", 1) for item in shlex.split(service["Environment"]))
    assert environment["ENGINE_STATE_DIR"] == state_dir
    assert environment["PYTHONPATH"] == service["WorkingDirectory"]  # -A's module importable


def test_the_systemd_unit_lets_the_drain_finish():
    service = load_unit()
    params = worker_params(unit_command(service)[1:])
    # SIGTERM to the supervisor only (it drains and stops its children), SIGKILL to all at the end.
    assert service["KillMode"] == "mixed"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert unit_seconds(service["TimeoutStopSec"]) > stop_deadline_floor(params)


def test_the_systemd_unit_restarts_on_failure_as_its_own_user():
    service = load_unit()
    assert service["Restart"] == "on-failure"
    assert service["User"] and service["User"] not in ("root", "0")
    assert "2" in service["RestartPreventExitStatus"].split()  # a usage error: no restart fixes it
    assert service["Type"] in ("exec", "simple")  # engine-worker does not send sd_notify


# --- Docker --------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments) with continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # comments, also inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, "an instruction before FROM"
        stages[-1].append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation"
    return stages


def runtime_stage() -> dict[str, list[str]]:
    """The final stage's instructions by name (each instruction's argument strings, in order)."""
    found: dict[str, list[str]] = {}
    for keyword, rest in dockerfile_stages()[-1]:
        found.setdefault(keyword, []).append(rest)
    return found


def exec_form(text: str) -> list[str]:
    """An instruction's JSON exec form (a shell form would put sh between the signal and the worker)."""
    assert text.startswith("["), f"not the exec form: {text}"
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def image_worker_args() -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, engine-worker's arguments: what follows it in ENTRYPOINT, then CMD) of the image."""
    stage = runtime_stage()
    entrypoint = exec_form(stage["ENTRYPOINT"][-1])
    command = exec_form(stage["CMD"][-1])
    assert "engine-worker" in entrypoint, entrypoint
    return entrypoint, entrypoint[entrypoint.index("engine-worker") + 1:] + command


def healthcheck_command() -> list[str]:
    options, _, command = runtime_stage()["HEALTHCHECK"][-1].partition("CMD ")
    assert "--start-period" in options  # a journal replay may say 503 for a while
    return exec_form(command.strip())


def test_the_image_runs_engine_worker_under_tini_with_real_options():
    entrypoint, args = image_worker_args()
    params = worker_params(args)
    # tini is PID 1 (reaps orphans) and passes signals to engine-worker alone: -g would send
    # them to the whole process group, children and tasks' subprocesses included.
    assert entrypoint[0].endswith("/tini") and entrypoint[1:entrypoint.index("engine-worker")] == ["--"]
    assert any("tini" in run for run in runtime_stage()["RUN"]), "tini is not installed in the final stage"
    assert params["shutdown_timeout"] is not None and params["concurrency"]
    assert dockerfile_stages()[-1][0] == ("FROM", "python:3.11-slim")
    # The app is in the image (and importable: the demo app of this tree).
    package = params["app_spec"].partition(":")[0].split(".")[0]
    assert any(shlex.split(copy)[0] == package for copy in runtime_stage()["COPY"])
    assert find_app(params["app_spec"]) is not None


def test_the_image_stops_on_sigterm_keeps_the_journal_on_a_volume_and_exposes_its_ports():
    stage = runtime_stage()
    _, args = image_worker_args()
    params = worker_params(args)
    assert stage["STOPSIGNAL"] == ["SIGTERM"]
    journal_dir = posixpath.dirname(params["journal"])
    volumes = [path for volume in stage["VOLUME"] for path in exec_form(volume)]
    assert journal_dir in volumes
    env = {}
    for item in stage["ENV"]:
        env.update(pair.split("=", 1) for pair in shlex.split(item))
    assert env["ENGINE_STATE_DIR"] == journal_dir  # the default journal would land there too
    exposed = {int(port.split("/")[0]) for expose in stage["EXPOSE"] for port in expose.split()}
    assert {port_of(bind) for bind in params["binds"]} | {params["metrics_port"]} <= exposed
    user = stage["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: Kubernetes' runAsNonRoot can verify it


def test_the_healthcheck_asks_healthz_on_the_metrics_port():
    _, args = image_worker_args()
    params = worker_params(args)
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    url = re.search(r"http://[^'\"\s]+", command[2])
    assert url, command
    parts = urlsplit(url.group(0))
    assert parts.path == "/healthz" and parts.port == params["metrics_port"]


class _Probe(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the base class's name
        self.send_response(self.server.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def test_the_healthcheck_fails_on_503():
    """The python -c probe exits 0 on /healthz's 200 and raises (exit 1: unhealthy) on its 503."""
    _, args = image_worker_args()
    metrics_port = worker_params(args)["metrics_port"]
    code = healthcheck_command()[2]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        local = code.replace(f":{metrics_port}/", f":{server.server_port}/")
        assert local != code
        server.status = 200
        exec(compile(local, "HEALTHCHECK", "exec"), {})
        server.status = 503
        with pytest.raises(urllib.error.HTTPError):
            exec(compile(local, "HEALTHCHECK", "exec"), {})
    finally:
        server.shutdown()
        server.server_close()


def test_the_dockerignore_lets_in_what_the_dockerfile_copies():
    allowed = {line[1:] for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    assert "*" in DOCKERIGNORE.read_text().splitlines()  # an allow list: nothing else in the context
    for stage in dockerfile_stages():
        for keyword, rest in stage:
            if keyword == "COPY" and not rest.startswith("--from"):
                *sources, _ = shlex.split(rest)
                assert set(sources) <= allowed, f"COPY {rest}: not let in by {DOCKERIGNORE.name}"


# --- Kubernetes ----------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """The manifest's documents by kind (one of each)."""
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    kinds = [doc["kind"] for doc in docs]
    assert sorted(kinds) == ["Deployment", "Job", "Service"], kinds
    return {doc["kind"]: doc for doc in docs}


def only_container(doc: dict) -> dict:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container's number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def env_value(container: dict, name: str, namespace: str = "default") -> str:
    """An env var's value with Kubernetes' ``$(VAR)`` references expanded (earlier vars only)."""
    known: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: known[m.group(1)], var["value"])
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, var
            value = namespace
        known[var["name"]] = value
    return known[name]


def deployment_worker() -> tuple[dict, dict, dict]:
    """(the Deployment's pod spec, its worker container, engine-worker's parsed options)."""
    deployment = manifests()["Deployment"]
    container = only_container(deployment)
    # No command: the image's ENTRYPOINT (tini -- engine-worker) runs, with these arguments.
    assert "command" not in container
    entrypoint, _ = image_worker_args()
    assert entrypoint[-1] == "engine-worker"
    return deployment["spec"]["template"]["spec"], container, worker_params(container["args"])


def pre_stop_seconds(container: dict) -> float:
    """Seconds a preStop hook takes out of the grace period (a sleep), 0 without one."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0].endswith("sleep"), f"count this preStop hook's time here: {command}"
    return float(command[1])


def test_the_service_is_headless_and_names_the_worker_pods():
    docs = manifests()
    spec = docs["Service"]["spec"]
    assert spec["clusterIP"] == "None"
    # Draining workers stay in DNS: their clients keep the link tasks are handed back over.
    assert spec["publishNotReadyAddresses"] is True
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    client_labels = docs["Job"]["spec"]["template"]["metadata"]["labels"]
    assert not spec["selector"].items() <= client_labels.items(), "the client's pods would be listed as workers"


def test_the_deployment_runs_a_real_engine_worker_command_on_the_service_port():
    service = manifests()["Service"]["spec"]
    _, container, params = deployment_worker()
    (bind,) = params["binds"]
    (tasks,) = [p for p in service["ports"] if p["name"] == "tasks"]
    # Headless: clients connect to the pods' own port, so the three are one number.
    assert tasks["port"] == port_of(bind) == container_port(container, tasks["targetPort"])
    # One child per requested CPU (os.cpu_count() in a pod is the node's).
    assert params["concurrency"] == int(container["resources"]["requests"]["cpu"])
    assert find_app(params["app_spec"]) is not None


def test_the_grace_period_covers_the_drain():
    pod, container, params = deployment_worker()
    assert pod["terminationGracePeriodSeconds"] > stop_deadline_floor(params) + pre_stop_seconds(container)


def test_the_probes_ask_healthz_on_the_metrics_port():
    _, container, params = deployment_worker()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert container_port(container, get["port"]) == params["metrics_port"], probe


def test_the_journal_is_on_a_volume_of_its_pod():
    pod, container, params = deployment_worker()
    journal_dir = posixpath.dirname(params["journal"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == journal_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    # One per pod: a claim shared by the replicas would hold one journal that only one worker may open.
    assert "emptyDir" in volume, volume
    assert not mount.get("readOnly")
    security = pod["securityContext"]
    user = runtime_stage()["USER"][-1].split(":")[0]
    assert security["runAsNonRoot"] and security["runAsUser"] == int(user) and security["fsGroup"]


def test_workers_and_the_client_name_the_service_by_dns():
    docs = manifests()
    service = docs["Service"]
    (tasks,) = [p for p in service["spec"]["ports"] if p["name"] == "tasks"]
    _, worker, _ = deployment_worker()
    client = only_container(docs["Job"])
    assert client["image"] == worker["image"]
    for container in (worker, client):
        entry = env_value(container, "DEMO_ENDPOINT", namespace="jobs")
        assert discovery.is_dns(entry), entry
        parts = urlsplit(entry[len(discovery.SCHEME):])
        assert parts.hostname == f"{service['metadata']['name']}.jobs.svc.cluster.local"
        assert parts.port == tasks["port"]


def test_the_client_example_is_valid_engine_code(monkeypatch):
    """The Job's script: its app is the workers', its settings exist, its entry resolves (DNS faked)."""
    docs = manifests()
    client = only_container(docs["Job"])
    _, _, params = deployment_worker()
    assert client["command"] == ["python", "-c"]
    (script,) = client["args"]
    tree = ast.parse(script)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert params["app_spec"].partition(":")[0] in imported
    (update,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and node.func.attr == "update"]
    settings = {kw.arg: ast.literal_eval(kw.value) for kw in update.keywords}
    assert {"transport_dns_refresh", "transport_max_peers"} <= settings.keys()
    entry = env_value(client, "DEMO_ENDPOINT")
    app = Engine("deploy-check", transport=entry, backend=env_value(client, "DEMO_BACKEND"))
    app.conf.update(**settings)  # an unknown name or a bad value raises
    seen = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        seen.append((host, port))
        return [(2, 1, 6, "", ("10.0.0.7", port)), (2, 1, 6, "", ("10.0.0.8", port))]

    monkeypatch.setattr(discovery.socket, "getaddrinfo", fake_getaddrinfo)
    assert discovery.expand([app.conf.transport]) == ["tcp://10.0.0.7:5555", "tcp://10.0.0.8:5555"]
    assert seen == [("engine-workers.default.svc.cluster.local", 5555)]


def test_the_readme_points_at_the_files():
    readme = (ROOT / "README.md").read_text()
    for path in (UNIT, DOCKERFILE, MANIFEST):
        assert str(path.relative_to(ROOT)) in readme
