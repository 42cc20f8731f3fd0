"""deploy/: the compose file, the Kubernetes manifests, the systemd units and the Dockerfile are
checked by the validators that can be installed here (the compose specification's JSON Schema,
`docker compose config` or `docker-compose config` when one is installed, the Kubernetes
OpenAPI schemas of kubernetes-validate, `systemd-analyze verify`, the Dockerfile parser of
BuildKit), and for what cronfleet itself needs of them: one image for every role, a
`cronfleet doctor --quick --role ROLE` health check on every process, secrets only from files.
A validator that cannot run here skips its test, saying why."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
ROLES = ("scheduler", "worker", "monitor")
SECRET_VARIABLES = ("CRONFLEET_AMQP_URL", "CRONFLEET_DATABASE_URL", "CRONFLEET_KEYS")


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object of deploy/k8s (not the kustomization), with its file's name."""
    return [
        (path.name, document)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _doctor_fits(command: list[str] | tuple[str, ...], probe_timeout: float) -> bool:
    """Whether `cronfleet doctor --quick --timeout T` ends before the probe gives up on it: three
    checks of at most T + 1 s each (the backstop), and a few seconds to start Python."""
    words = list(command)
    return 3 * (float(words[words.index("--timeout") + 1]) + 1) + 5 <= probe_timeout


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def _doctor_role(command: list[str]) -> str | None:
    """The --role of a `cronfleet doctor --quick` command, None if it is another command."""
    words = command[command.index("cronfleet") :] if "cronfleet" in command else []
    if words[:3] != ["cronfleet", "doctor", "--quick"] or "--role" not in words:
        return None
    return words[words.index("--role") + 1]


# -- compose ------------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def test_compose_file_is_accepted_by_docker_compose() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` (the plugin) nor `docker-compose` is installed here")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        cwd=DEPLOY,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_every_role_from_one_image_with_a_doctor_health_check() -> None:
    services = _compose()["services"]
    cronfleet = {name: spec for name, spec in services.items() if "build" in spec}
    assert set(cronfleet) == {"migrate", "scheduler", "worker", "monitor", "cli"}
    assert len({spec["image"] for spec in cronfleet.values()}) == 1
    assert {spec["build"]["dockerfile"] for spec in cronfleet.values()} == {"deploy/Dockerfile"}
    for role in ROLES:
        spec = services[role]
        assert spec["command"][0] == role
        assert _doctor_role(spec["healthcheck"]["test"]) == role, role
        assert _doctor_fits(spec["healthcheck"]["test"], _seconds(spec["healthcheck"]["timeout"])), role
        assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"]
    assert services["scheduler"]["deploy"]["replicas"] == 2
    # `--scale worker=N` needs a worker without a fixed name or published port.
    assert not {"container_name", "ports", "hostname"} & set(services["worker"])
    assert services["monitor"]["ports"][0].endswith(":8080")
    assert services["monitor"]["command"] == ["monitor", "--http", "0.0.0.0:8080"]
    # The processes wait for the one-shot migration, which waits for PostgreSQL.
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for role in ROLES:
        assert services[role]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["rabbitmq"] and "healthcheck" in services["postgres"]


def test_compose_passes_every_secret_as_a_file() -> None:
    compose = _compose()
    assert all(set(secret) == {"file"} for secret in compose["secrets"].values())
    for name, spec in compose["services"].items():
        environment = spec.get("environment", {})
        assert not set(SECRET_VARIABLES) & set(environment), name
        assert not any("PASSWORD" in key and not key.endswith("_FILE") for key in environment), name
    for role in ROLES:
        secrets = compose["services"][role]["secrets"]
        keys = next(s for s in secrets if isinstance(s, dict) and s["target"] == "keys")
        assert keys["source"] == f"keys_{role}"  # each process gets its role's keys only
    assert compose["x-cronfleet"]["environment"]["CRONFLEET_KEYS_FILE"] == "/run/secrets/keys"


def test_make_secrets_writes_every_file_compose_reads(tmp_path: Path) -> None:
    cronfleet = Path(sys.executable).with_name("cronfleet")
    result = subprocess.run(
        [str(DEPLOY / "make-secrets"), str(tmp_path / "secrets")],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": f"{cronfleet.parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    for secret in _compose()["secrets"].values():
        written = tmp_path / secret["file"]
        assert written.is_file() and written.read_text().strip(), secret["file"]
    worker_keys = (tmp_path / "secrets" / "keys_worker").read_text()
    assert ":ed25519-public:" in worker_keys and ":ed25519:" not in worker_keys
    password = (tmp_path / "secrets" / "postgres_password").read_text().strip()
    assert f":{password}@postgres:5432/" in (tmp_path / "secrets" / "database_url").read_text()


# -- Kubernetes ---------------------------------------------------------------------------------


def test_manifests_follow_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    for name, document in _manifests():
        try:
            kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message}")


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_each_role_has_a_deployment_with_probes_its_own_keys_and_no_privilege() -> None:
    objects = _manifests()
    deployments = {doc["metadata"]["name"]: doc for _, doc in objects if doc["kind"] == "Deployment"}
    assert set(deployments) == {f"cronfleet-{role}" for role in ROLES}
    for role in ROLES:
        pod = deployments[f"cronfleet-{role}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"][0] == role
        readiness = container["readinessProbe"]
        assert _doctor_role(readiness["exec"]["command"]) == role
        assert _doctor_fits(readiness["exec"]["command"], readiness["timeoutSeconds"])
        liveness = container["livenessProbe"]
        if "exec" in liveness:
            assert _doctor_role(liveness["exec"]["command"]) == role
            assert _doctor_fits(liveness["exec"]["command"], liveness["timeoutSeconds"])
        else:
            assert liveness["httpGet"]["port"] == "http"  # the monitor's own HTTP server
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        (secret,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
        assert {item["key"] for item in secret["items"]} == {"amqp-url", "database-url", f"keys-{role}"}
        variables = {e["name"] for e in container["env"]}
        assert not set(SECRET_VARIABLES) & variables
        assert {"CRONFLEET_AMQP_URL_FILE", "CRONFLEET_DATABASE_URL_FILE", "CRONFLEET_KEYS_FILE"} <= variables
    worker_pod = deployments["cronfleet-worker"]["spec"]["template"]["spec"]
    assert worker_pod["terminationGracePeriodSeconds"] > 25  # CRONFLEET_DRAIN_SECONDS
    assert deployments["cronfleet-scheduler"]["spec"]["replicas"] >= 2


def test_the_monitor_service_and_the_worker_budget_select_their_pods() -> None:
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in _manifests()}
    monitor = objects[("Deployment", "cronfleet-monitor")]
    service = objects[("Service", "cronfleet-monitor")]
    labels = monitor["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in monitor["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    budget = objects[("PodDisruptionBudget", "cronfleet-worker")]
    worker_labels = objects[("Deployment", "cronfleet-worker")]["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    secret_keys = set(objects[("Secret", "cronfleet")]["stringData"])
    assert {f"keys-{role}" for role in ROLES} | {"amqp-url", "database-url"} <= secret_keys


# -- systemd ------------------------------------------------------------------------------------


def _units_here(tmp_path: Path) -> list[Path]:
    """The units, copied with ExecStart pointing at this environment's cronfleet (verify checks
    that the program exists), the worker template also as an instance and with the run_as
    drop-in folded in."""
    cronfleet = str(Path(sys.executable).with_name("cronfleet"))
    units = []
    for unit in [*sorted(SYSTEMD.glob("cronfleet*.service")), SYSTEMD / "cronfleet.target"]:
        text = unit.read_text().replace("/opt/cronfleet/bin/cronfleet", cronfleet)
        (tmp_path / unit.name).write_text(text)
        if unit.name == "cronfleet-worker@.service":
            (tmp_path / "cronfleet-worker@default.service").write_text(text)
            drop_in = (SYSTEMD / "cronfleet-worker@.service.d" / "run-as.conf.example").read_text()
            (tmp_path / "cronfleet-worker@runas.service").write_text(text + drop_in)
            units.append(tmp_path / "cronfleet-worker@default.service")
            units.append(tmp_path / "cronfleet-worker@runas.service")
        else:
            units.append(tmp_path / unit.name)
    return units


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    units = _units_here(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warnings


def test_systemd_units_are_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    for unit in _units_here(tmp_path):
        if unit.name.endswith("@runas.service") or unit.suffix != ".service":
            continue
        result = subprocess.run(
            [analyze, "security", "--offline=true", "--no-pager", str(unit)],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )
        if "--offline" in result.stderr:
            pytest.skip("this systemd-analyze cannot score unit files offline (systemd < 250)")
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert found is not None, result.stdout + result.stderr
        # systemd calls 0-2 "OK"; an unhardened service scores 9.6.
        assert float(found.group(1)) <= 2.0, (unit.name, found.group(1))


def test_systemd_units_take_secrets_as_credentials() -> None:
    for unit in SYSTEMD.glob("cronfleet-*.service"):
        text = unit.read_text()
        assert "NoNewPrivileges=yes" in text and "User=cronfleet" in text, unit.name
        assert not re.search(
            r"^Environment=(CRONFLEET_AMQP_URL|CRONFLEET_DATABASE_URL|CRONFLEET_KEYS)=", text, re.M
        )
        for line in re.findall(r"^Environment=(CRONFLEET_\w+_FILE)=(.*)$", text, re.M):
            assert line[1].startswith("%d/"), (unit.name, line)


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_builds_one_small_non_root_image_for_every_role() -> None:
    import dockerfile

    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    stages = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    assert len(stages) == 2, "a build stage and a final stage"
    final = commands[stages[1] :]
    by_name = {c.cmd: c for c in final}
    assert by_name["USER"].value[0].split(":")[0] not in {"0", "root"}
    assert by_name["ENTRYPOINT"].value[-1] == "cronfleet"
    health = by_name["HEALTHCHECK"]
    assert health.value[:4] == ("CMD", "cronfleet", "doctor", "--quick")
    flags = dict(flag.removeprefix("--").split("=") for flag in health.flags)
    assert _doctor_fits(health.value, _seconds(flags["timeout"]))
    # Only the built virtualenv comes from the build stage; nothing is compiled or built here.
    copies = [c for c in final if c.cmd == "COPY"]
    assert [(c.flags, c.value) for c in copies] == [(("--from=build",), ("/opt/cronfleet", "/opt/cronfleet"))]
    final_runs = " ".join(" ".join(c.value) for c in final if c.cmd == "RUN")
    assert not re.search(r"\b(gcc|build-essential|pip wheel|python -m build)\b", final_runs)
    # No CRONFLEET_* default in the image: it would win over the *_FILE secrets.
    assert not any(c.cmd == "ENV" and any(v.startswith("CRONFLEET_") for v in c.value) for c in commands)


def test_dockerfile_copies_only_what_its_ignore_file_lets_through() -> None:
    import dockerfile

    allowed = {
        line[1:]
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for command in dockerfile.parse_file(str(DEPLOY / "Dockerfile")):
        if command.cmd == "COPY" and not command.flags:
            sources = command.value[:-1]
            assert set(sources) <= allowed, sources
            assert all((ROOT / source).exists() for source in sources)
