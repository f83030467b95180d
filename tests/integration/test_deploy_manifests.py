"""The deployment examples (examples/kubernetes/, examples/systemd/) say only what the programs
accept: no cluster or systemd here, so what can be checked is checked with the real things —
every command line through the real argparse parsers of ``pake-sidecar`` and ``pakectl``,
every embedded ``sidecar.yaml`` / ``mesh.yaml`` through the real config loaders, and every
port and path against the one it must meet (Service -> container -> flag -> config, mount ->
file, unit -> state directory)."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from control.cli import build_parser as pakectl_parser
from control.replica import parse_store_url
from sidecar.__main__ import build_parser as sidecar_parser
from sidecar.config.load import load_bootstrap, load_mesh
from sidecar.config.model import Bootstrap

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "examples" / "kubernetes"
SYSTEMD = ROOT / "examples" / "systemd"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def parse(argv: list[str]) -> argparse.Namespace:
    """A command line as the installed program would parse it (an error fails the test)."""
    program = PurePosixPath(argv[0]).name
    assert program in SCRIPTS, f"{argv[0]}: not a program the project installs ({sorted(SCRIPTS)})"
    parser = sidecar_parser() if program == "pake-sidecar" else pakectl_parser()
    try:
        return parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse's way of refusing
        raise AssertionError(f"{shlex.join(argv)}: refused by {program} (exit {exc.code})") from None
    except Exception as exc:  # pakectl's parser raises UsageError
        raise AssertionError(f"{shlex.join(argv)}: {exc}") from None


def address(value: tuple[str, int] | None) -> str:
    assert value is not None
    return f"{value[0]}:{value[1]}"


def bootstrap_from(text: str, tmp_path: Path, name: str = "sidecar.yaml") -> Bootstrap:
    path = tmp_path / name
    path.write_text(text)
    return load_bootstrap(path)  # ConfigError names the path and the value


# === Kubernetes ===============================================================================


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def all_documents() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) if f.name != "mesh.yaml" for d in documents(f.name)]


def pod_containers(deploy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deploy["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def mounted(deploy: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The pod volume under which ``path`` lies in ``container``, and the path inside it."""
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    best = None
    for mount in container.get("volumeMounts", []):
        mount_path = mount["mountPath"].rstrip("/")
        if path == mount_path or path.startswith(mount_path + "/"):
            if best is None or len(mount_path) > len(best["mountPath"]):
                best = mount
    assert best is not None, f"{container['name']}: nothing is mounted at {path}"
    return volumes[best["name"]], path[len(best["mountPath"].rstrip("/")):].lstrip("/")


def secret_keys(docs: list[dict[str, Any]], namespace: str, name: str) -> set[str]:
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name
                and d["metadata"]["namespace"] == namespace]
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def test_every_kubernetes_manifest_parses_and_names_a_namespace() -> None:
    docs = all_documents()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "pake-control"), ("Service", "pake-control"), ("Deployment", "orders"),
            ("Secret", "pake-ca"), ("Secret", "pake-store-key"), ("Secret", "orders-join-token"),
            ("ConfigMap", "orders-sidecar")} <= kinds
    for d in docs:
        assert d["apiVersion"] and (d["kind"] == "Namespace" or d["metadata"].get("namespace"))


def test_the_control_plane_runs_two_replicas_on_etcd_with_its_secrets_where_serve_reads_them() -> None:
    docs = documents("control-plane.yaml")
    deploy = find(docs, "Deployment", "pake-control")
    assert deploy["spec"]["replicas"] == 2
    [serve] = deploy["spec"]["template"]["spec"]["containers"]
    args = parse(serve["command"] + serve.get("args", []))
    assert args.command == "serve"
    assert parse_store_url(args.store) == ("http://etcd.pake-system.svc:2379",)
    assert args.lease_ttl >= 2 and args.lease_ttl == int(args.lease_ttl)
    assert args.admin[0] == "127.0.0.1", "the admin API stays on loopback (no token needed)"
    # The Service reaches the container port that --listen binds.
    ports = {p["name"]: p["containerPort"] for p in serve["ports"]}
    service = find(docs, "Service", "pake-control")
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    [port] = service["spec"]["ports"]
    assert ports[port["targetPort"]] == args.listen[1] == port["port"]
    assert args.listen[0] == "0.0.0.0"
    assert serve["readinessProbe"]["tcpSocket"]["port"] in ports
    # The init container installs the CA files where serve imports them (<state-dir>/ca) and
    # the store key where --store-key-file points, from the Secrets' own keys, on the volume
    # that serve mounts at --state-dir.
    [install] = deploy["spec"]["template"]["spec"]["initContainers"]
    script = install["command"][-1]
    state = str(args.state_dir)
    assert mounted(deploy, install, state) == mounted(deploy, serve, state)
    assert str(args.store_key_file).startswith(state + "/")
    for secret, files, target in (("pake-ca", ("ca.pem", "ca-key.pem", "bundle.pem"), f"{state}/ca/"),
                                  ("pake-store-key", ("store.key",), str(args.store_key_file))):
        assert secret_keys(docs, "pake-system", secret) == set(files)
        for file in files:
            source = re.search(rf"(\S+/{re.escape(file)})\b", script)
            assert source is not None, f"{file} is not installed"
            volume, inside = mounted(deploy, install, source.group(1))
            assert volume["secret"]["secretName"] == secret and inside == file
        assert f" {target}" in script and "-m 0600" in script


def test_the_service_runs_the_sidecar_as_a_native_sidecar_with_ports_paths_and_probes_that_match(
        tmp_path: Path) -> None:
    docs = documents("orders.yaml")
    control = documents("control-plane.yaml")
    deploy = find(docs, "Deployment", "orders")
    spec = deploy["spec"]["template"]["spec"]
    [sidecar] = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar (Kubernetes 1.29+)"
    args = parse(sidecar["command"] + sidecar.get("args", []))
    assert args.command == "run" and args.app == []
    # The sidecar.yaml it reads is the ConfigMap's, and the real loader accepts it.
    volume, key = mounted(deploy, sidecar, args.config)
    configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
    boot = bootstrap_from(configmap["data"][key], tmp_path)
    assert boot.service == "orders" and boot.control is not None
    # The control plane's Service is what the sidecar dials.
    service = find(control, "Service", "pake-control")
    [(host, port)] = boot.control.addresses
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert port == service["spec"]["ports"][0]["port"]
    # The token file is the join Secret's key; the state directory is on a writable volume.
    assert boot.control.token_file is not None
    volume, key = mounted(deploy, sidecar, str(boot.control.token_file))
    assert key in secret_keys(docs, "pake-demo", volume["secret"]["secretName"])
    volume, _ = mounted(deploy, sidecar, str(boot.control.state_dir))
    assert "emptyDir" in volume
    # The container port is the inbound listener's; the probes ask the admin listener.
    inbound, admin = boot.listener("inbound"), boot.listener("admin")
    outbound = boot.listener("outbound")
    assert inbound is not None and admin is not None and outbound is not None
    assert [p["containerPort"] for p in sidecar["ports"]] == [inbound.address[1]]
    for probe in ("startupProbe", "readinessProbe"):
        probed = parse(sidecar[probe]["exec"]["command"])
        assert probed.command == "wait-ready" and probed.admin == admin.address
        assert probed.timeout < sidecar[probe]["periodSeconds"] + 1
    # The app listens where the sidecar sends inbound traffic and calls out through it.
    [app] = spec["containers"]
    assert app["args"][app["args"].index("--listen") + 1] == address(boot.app)
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["HTTP_PROXY"] == "http://" + address(outbound.address)
    # The pod's grace covers the sidecar's drain after the app.
    assert spec["terminationGracePeriodSeconds"] > boot.timeouts.drain
    # The mesh config names this service, and the real loader accepts it.
    assert "orders" in load_mesh(K8S / "mesh.yaml").services


def test_the_dockerfile_installs_the_project_on_python_311_slim_with_its_hot_path_compiled() -> None:
    lines = [l.strip() for l in (K8S / "Dockerfile").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    # a build stage (gcc, mypy) compiles the installed sidecar's hot path, and must succeed;
    # the image is a fresh python:3.11-slim with what the build stage installed
    assert [l for l in lines if l.startswith("FROM")] == ["FROM python:3.11-slim AS build",
                                                           "FROM python:3.11-slim"]
    assert any("python -m sidecar.compiled build --required" in l for l in lines)
    assert "COPY --from=build /usr/local /usr/local" in lines
    copies = [l for l in lines if l.startswith("COPY") and not l.startswith("COPY --from")]
    copied = [l.split()[1] for l in copies]
    sources = [s for line in copies for s in line.split()[1:-1]]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    assert "pyproject.toml" in copied
    packages = {p.split(".")[0] for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources), "every package that ships is copied in"
    assert any(l.startswith("RUN pip install") and " . " in l + " " for l in lines)
    entry = yaml.safe_load(next(l for l in lines if l.startswith("ENTRYPOINT")).split(None, 1)[1])
    cmd = yaml.safe_load(next(l for l in lines if l.startswith("CMD")).split(None, 1)[1])
    assert parse(entry + cmd).command == "run"


# === systemd =================================================================================


def unit(name: str, instance: str = "") -> dict[str, dict[str, list[str]]]:
    """A unit file's sections -> key -> values (systemd allows a key more than once), with
    ``%i`` set to ``instance``."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: {line!r} is not key=value"
        current.setdefault(key, []).append(value.replace("%i", instance))
    return sections


def command(values: list[str]) -> list[str]:
    [line] = values
    return shlex.split(line)


def test_the_systemd_units_run_commands_the_programs_accept_on_matching_paths_and_ports(
        tmp_path: Path) -> None:
    control = unit("pake-control.service")["Service"]
    serve = parse(command(control["ExecStart"]))
    assert serve.command == "serve"
    assert str(serve.state_dir) == "/var/lib/" + control["StateDirectory"][0]

    sidecar = unit("pake-sidecar@.service", "orders")["Service"]
    run = parse(command(sidecar["ExecStart"]))
    assert run.command == "run" and run.config == "/etc/pake/orders/sidecar.yaml"
    assert command(sidecar["ExecReload"])[-2:] == ["-HUP", "$MAINPID"]
    # The example sidecar.yaml is the one installed at run.config (README): the loader takes it.
    example = SYSTEMD / "orders" / "sidecar.yaml"
    boot = load_bootstrap(example)
    assert boot.service == "orders" and boot.control is not None
    assert str(boot.control.state_dir) == "/var/lib/" + sidecar["StateDirectory"][0]
    assert boot.control.addresses[0][1] == serve.listen[1], "sidecars dial the control plane's port"

    app = unit("orders.service")
    assert app["Unit"]["Requires"] == app["Unit"]["After"] == ["pake-sidecar@orders.service"]
    wait = parse(command(app["Service"]["ExecStartPre"]))
    assert wait.command == "wait-ready" and wait.config == run.config
    admin = boot.listener("admin")
    assert admin is not None and admin.address[1] != 0, "wait-ready -c needs a fixed admin port"
    listen = command(app["Service"]["ExecStart"])
    assert listen[listen.index("--listen") + 1] == address(boot.app)
    outbound = boot.listener("outbound")
    assert outbound is not None
    assert app["Service"]["Environment"] == ["HTTP_PROXY=http://" + address(outbound.address)]


@pytest.mark.parametrize("argv", [
    ["pake-sidecar", "wait-ready", "-c", "x.yaml", "--admin", "127.0.0.1:15000"],
    ["pake-sidecar", "wait-ready", "--timeout", "soon"],
    ["pakectl", "serve", "--state-dir", "/s", "--listen", "15010"],
    ["pake-proxy", "run"],
])
def test_the_checker_itself_refuses_what_the_programs_refuse(argv: list[str]) -> None:
    with pytest.raises(AssertionError):
        parse(argv)
