"""The deployable stack, checked statically: no Docker engine or cluster is needed.

The compose file validates against the Compose Specification's JSON schema and agrees with
the package's settings; the Kubernetes manifests and the Helm values' Kubernetes parts
deserialize strictly into the ``kubernetes`` client's models and agree with the GPU config.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from kubernetes_models import InvalidObject, validate, validate_manifest

from sd_pipeline.config import PipelineConfig, load_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
KUBE = REPO / "deploy" / "kubernetes"
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|ACCESS_KEY", re.I)
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $.
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation, for the forms the compose file uses."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        value = env.get(name)
        unset = value is None or (value == "" and bool(op) and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else value  # type: ignore[return-value]
        if op in (":?", "?") and unset:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return INTERPOLATION.sub(sub, value)


def variables(text: str) -> dict[str, str | None]:
    """Every ${VAR} the text uses outside comments -> its operator (None, ':-', ':?', ...)."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return {m.group(1): m.group(2) for m in INTERPOLATION.finditer(code) if m.group(1)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<) resolved here
    return interpolate(raw, read_env_file(ENV_EXAMPLE))  # type: ignore[no-any-return]


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# -- compose -------------------------------------------------------------------------------


def test_the_compose_file_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    jsonschema.Draft201909Validator(schema).validate(compose)
    # And the validator is not a pushover.
    broken = {**compose, "services": {**compose["services"], "minio": {**compose["services"]["minio"],
                                                                      "helthcheck": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(schema).validate(broken)


def test_the_stack_has_every_service_and_each_waits_for_what_it_needs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer"} <= set(services)
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            if how["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is one-shot; it must not restart"
    # No cycles: a topological order exists.
    done: set[str] = set()
    while len(done) < len(services):
        ready = {n for n, s in services.items() if n not in done and set(s.get("depends_on") or {}) <= done}
        assert ready, f"depends_on cycle among {set(services) - done}"
        done |= ready
    for name in services:
        if name.startswith("airflow-"):
            assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_ports_and_addresses_agree_between_services_and_the_package(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = service_env(services["airflow-scheduler"])

    def published(name: str) -> set[str]:
        return {p.rsplit(":", 1)[1] for p in services[name].get("ports", [])}

    minio_port = flag(services["minio"]["command"], "--address").lstrip(":")
    mlflow_port = flag(services["mlflow"]["command"], "--port")
    api_port = flag(services["airflow-apiserver"]["command"], "--port")
    assert minio_port in published("minio") and mlflow_port in published("mlflow")
    assert api_port in published("airflow-apiserver")
    for url, host, port in [(env["AWS_ENDPOINT_URL"], "minio", minio_port),
                            (env["MLFLOW_TRACKING_URI"], "mlflow", mlflow_port),
                            (env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"], "airflow-apiserver", api_port),
                            (service_env(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"], "minio", minio_port)]:
        parsed = urlparse(url)
        assert (parsed.hostname, str(parsed.port)) == (host, port), url
        assert host in services

    # Airflow's and MLflow's databases are the postgres service's, with its user and password.
    pg = service_env(services["postgres"])
    airflow_db = urlparse(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert (airflow_db.hostname, airflow_db.username, airflow_db.password, airflow_db.path) == (
        "postgres", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], f"/{pg['POSTGRES_DB']}")
    mlflow_db = urlparse(service_env(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    assert (mlflow_db.hostname, mlflow_db.password) == ("postgres", env["MLFLOW_DB_PASSWORD"])

    # MLflow answers to the name the tasks call it by.
    allowed = service_env(services["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert urlparse(env["MLFLOW_TRACKING_URI"]).netloc in allowed


def test_the_pipeline_config_of_the_stack_loads_and_points_at_its_services(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    env = service_env(services["airflow-scheduler"])
    # Every Airflow component runs the same image with the same environment.
    for name in ("init", "airflow-apiserver", "airflow-dag-processor", "airflow-triggerer"):
        assert service_env(services[name]) == env and services[name]["image"] == services["init"]["image"]
    config_file = REPO / env["SD_PIPELINE_CONFIG"].removeprefix("/opt/sd-pipeline/")
    assert config_file.is_file(), f"{env['SD_PIPELINE_CONFIG']} is not in the repository"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = load_config(config_file)

    assert config.storage.endpoint_url == env["AWS_ENDPOINT_URL"]
    assert urlparse(config.storage.root).netloc == env["SD_PIPELINE_BUCKET"]  # the bucket init creates
    assert config.registry.tracking_uri == env["MLFLOW_TRACKING_URI"]
    artifacts = urlparse(service_env(services["mlflow"])["MLFLOW_ARTIFACTS_DESTINATION"])
    assert artifacts.netloc == env["MLFLOW_BUCKET"]
    # One machine, no cluster: the local backend trains, so the image has the training stack.
    assert config.compute.backend_for("train") == config.compute.backend_for("evaluate") == "local"
    assert "train" in services["init"]["build"]["args"]["SD_PIPELINE_EXTRAS"].split(",")
    assert services["init"]["volumes"][0].endswith(":" + env["SD_PIPELINE_HOME"])


def test_no_secret_is_written_into_the_compose_file() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    example = read_env_file(ENV_EXAMPLE)
    for name, service in raw["services"].items():
        for key, value in service_env(service).items():
            if SECRET_LIKE.search(key) or "@" in value:
                assert "${" in value, f"{name}.{key} holds a literal credential; use a ${{VAR}} from .env"
    # Every variable without a default is documented in .env.example, with a placeholder.
    for var, op in variables(COMPOSE.read_text()).items():
        if op not in (":-", "-"):
            assert var in example, f"${{{var}}} is used by docker-compose.yaml but missing from .env.example"
        if SECRET_LIKE.search(var):
            assert example[var].startswith("change-me"), f".env.example must not carry a real {var}"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_the_dockerfiles_copy_what_exists_and_split_airflow_from_training() -> None:
    airflow = (REPO / "docker" / "airflow.Dockerfile").read_text()
    train = (REPO / "docker" / "train.Dockerfile").read_text()
    for dockerfile in ("airflow", "train", "mlflow"):
        text = (REPO / "docker" / f"{dockerfile}.Dockerfile").read_text()
        ignore = (REPO / "docker" / f"{dockerfile}.Dockerfile.dockerignore").read_text()
        kept = [line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")]
        for path in kept:
            if path != "plugins":  # optional: the DAGs run without plugins
                assert (REPO / path).exists(), f"{dockerfile}.Dockerfile's context keeps missing {path}"
        for line in text.splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for src in line.split()[1:-1]:
                    if not src.startswith("--") and src != ".":
                        assert src.rstrip("/") in kept, f"{dockerfile}.Dockerfile: {src} not in context"
        for image in re.findall(r"^FROM\s+(\S+)", text, re.M):
            assert ":" in image and not image.endswith(":latest"), f"{dockerfile}: unpinned {image}"
    default_extras = re.search(r"ARG SD_PIPELINE_EXTRAS=(\S+)", airflow).group(1).split(",")  # type: ignore[union-attr]
    assert "train" not in default_extras  # the Airflow image carries no training stack
    assert '".[train,s3,tracking]"' in train and "apache-airflow" not in train
    assert re.findall(r"^USER\s+(\S+)", train, re.M)[-1] == "1000"  # kubernetes.UID
    config_env = re.search(r"SD_PIPELINE_CONFIG=(\S+)", airflow).group(1)  # type: ignore[union-attr]
    assert (REPO / config_env.removeprefix("/opt/sd-pipeline/")).is_file()


# -- Kubernetes -------------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    files = [path for path in sorted(KUBE.glob("*.yaml")) if path.name != "airflow-values.yaml"]
    return [(f"{path.name}#{i}", doc) for path in files
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


def test_every_kubernetes_manifest_is_a_valid_object() -> None:
    kinds = set()
    for where, doc in manifests():
        obj = validate_manifest(doc, where)
        kinds.add(doc["kind"])
        assert obj.metadata.name
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PriorityClass", "ResourceQuota",
            "Secret"} <= kinds
    with pytest.raises(InvalidObject, match="'toleration'"):  # strict: unknown fields fail
        validate({"containers": [{"name": "x"}], "toleration": []}, "V1PodSpec")


def test_secret_templates_carry_no_values() -> None:
    for where, doc in manifests():
        if doc["kind"] == "Secret":
            assert "data" not in doc, f"{where}: use stringData placeholders, never encoded values"
            values = [v for v in doc["stringData"].values() if v not in ("", '{"auths": {}}')]
            assert values == [], f"{where} holds values"


def gpu_config(values: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    env = {e["name"]: e["value"] for e in values["env"]}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_config(REPO / env["SD_PIPELINE_CONFIG"].removeprefix("/opt/sd-pipeline/"))


def test_helm_values_and_manifests_agree_with_the_gpu_config(monkeypatch: pytest.MonkeyPatch) -> None:
    values = yaml.safe_load((KUBE / "airflow-values.yaml").read_text())
    config = gpu_config(values, monkeypatch)
    kube = config.compute.kubernetes
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in manifests()}

    # The chart's Kubernetes-shaped values are valid objects.
    validate(values["env"], "list[V1EnvVar]")
    for component in ("workers", "scheduler", "triggerer", "dagProcessor", "apiServer"):
        validate(values[component]["resources"], "V1ResourceRequirements")
    assert values["executor"] in {"KubernetesExecutor", "CeleryExecutor", "CeleryKubernetesExecutor"}
    assert values["config"]["core"]["dags_folder"] == "/opt/sd-pipeline/dags"
    assert values["images"]["airflow"]["repository"].endswith("/airflow")

    # The pods' namespace, identity, priority and credentials exist as the config names them.
    assert config.compute.backend_for("train") == "kubernetes"
    assert ("Namespace", kube.namespace) in objects
    assert objects[("ServiceAccount", kube.service_account)]["metadata"]["namespace"] == kube.namespace
    assert ("PriorityClass", kube.priority_class) in objects
    for ref in kube.secret_env:
        secret = objects[("Secret", ref.secret)]
        assert secret["metadata"]["namespace"] == kube.namespace and ref.key in secret["stringData"]
    assert objects[("ResourceQuota", "sd-pipeline-gpus")]["metadata"]["namespace"] == kube.namespace

    # The Airflow components that launch and follow the pods may do so in that namespace.
    binding = objects[("RoleBinding", "airflow-launches-sd-pipeline-pods")]
    assert binding["metadata"]["namespace"] == kube.namespace
    bound = {s["name"] for s in binding["subjects"]}
    launchers = {values[c]["serviceAccount"]["name"] for c in ("workers", "triggerer")}
    assert launchers <= bound
    rules = {(r, v) for rule in objects[("Role", binding["roleRef"]["name"])]["rules"]
             for r in rule["resources"] for v in rule["verbs"]}
    assert {("pods", "create"), ("pods", "delete"), ("pods/log", "get"), ("pods/exec", "create")} <= rules

    # The release's secrets have the keys the chart reads.
    for name_key, key in [("fernetKeySecretName", "fernet-key"), ("apiSecretKeySecretName", "api-secret-key"),
                          ("jwtSecretName", "jwt-secret")]:
        assert key in objects[("Secret", values[name_key])]["stringData"]
    assert "connection" in objects[("Secret", values["data"]["metadataSecretName"])]["stringData"]
