"""The GPU pod of a heavy stage, as the KubernetesPodOperator itself builds it (no cluster).

Pods are built with the operator's own ``build_pod_request_obj`` after rendering its
templates against a run's XCom, exactly as a task run does; the deferrable re-entry path is
driven with a stand-in for the cluster's answers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s
from kubernetes_models import validate

from sd_pipeline import compute
from sd_pipeline.airflow.kubernetes import StagePodOperator, stage_pod_operator
from sd_pipeline.config import ConfigError, PipelineConfig, parse_config

REPO = Path(__file__).resolve().parent.parent
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
SENTINEL = "sentinel-secret-value-0xDEADBEEF"
RUN = {
    "run_id": "sd15-0123456789ab",
    "config_uri": "s3://ml-bucket/sd/runs/sd15-0123456789ab/config.json",
    "dataset": "products",
    "dataset_version": "0123456789abcdef",
    "already_trained": False,
}


def kube_config(**overrides: Any) -> PipelineConfig:
    data = {
        "name": "sd15",
        "storage": {"root": "s3://ml-bucket/sd", "endpoint_url": "http://minio.storage:9000"},
        "dataset": {"name": "products"},
        "compute": {
            "backend": "kubernetes",
            "train": {"gpus": 1, "gpu_types": ["NVIDIA-A100-SXM4-80GB"], "cpu": "8", "memory": "64Gi",
                      "memory_limit": "72Gi", "shm": "16Gi"},
            "kubernetes": {
                "image": "registry.example/sd/train:1.2.3",
                "namespace": "ml-train",
                "service_account": "trainer",
                "image_pull_secrets": ["regcred"],
                "node_selector": {"pool": "gpu"},
                "priority_class": "training-high",
                "labels": {"team": "applied-ml"},
                "on_finish_action": "delete_succeeded_pod",
            },
        },
    }
    return parse_config(data, overrides)


class FakeTI:
    """What a template and the operator's pod labels read of a task instance."""

    dag_id = "sd_train"
    map_index = -1
    try_number = 1

    def __init__(self, task_id: str, run: dict[str, Any]) -> None:
        self.task_id = task_id
        self.run = run
        self.pushed: dict[str, Any] = {}

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value", **_: Any) -> Any:
        assert task_ids == "prepare_run" and key == "return_value"
        return self.run

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def build_pod(stage: str, config: PipelineConfig, run: dict[str, Any] = RUN
              ) -> tuple[StagePodOperator, k8s.V1Pod, dict[str, Any]]:
    with DAG("sd_train", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        op = stage_pod_operator(stage, config)
    context: dict[str, Any] = {"ti": FakeTI(stage, run), "run_id": "manual__2026-11-27", "dag": dag,
                               "task": op}
    op.render_template_fields(context)  # type: ignore[arg-type]
    return op, op.build_pod_request_obj(context, dry_run=True), context  # type: ignore[arg-type]


def base_container(pod: k8s.V1Pod) -> k8s.V1Container:
    return next(c for c in pod.spec.containers if c.name == "base")


def as_json(pod: k8s.V1Pod) -> dict[str, Any]:
    return ApiClient().sanitize_for_serialization(pod)  # type: ignore[no-any-return]


# -- the pod ----------------------------------------------------------------------------


def test_a_single_gpu_pod_carries_every_setting_of_the_config() -> None:
    op, pod, _ = build_pod("train", kube_config())
    base = base_container(pod)

    # The stage command, its run id and config from prepare_run's XCom, its result for XCom.
    assert base.command == ["sd-pipeline"]
    assert base.args == [*compute.stage_command("train", RUN["config_uri"], RUN["run_id"])[1:],
                         "--result-file", "/airflow/xcom/return.json"]
    assert base.image == "registry.example/sd/train:1.2.3"
    assert pod.metadata.namespace == "ml-train"
    assert pod.spec.service_account_name == "trainer"
    assert pod.spec.automount_service_account_token is False
    assert [s.name for s in pod.spec.image_pull_secrets] == ["regcred"]
    assert pod.spec.priority_class_name == "training-high"
    assert pod.spec.restart_policy == "Never"

    # GPU, CPU and memory: requests and limits.
    assert base.resources.limits == {"cpu": "8", "memory": "72Gi", "nvidia.com/gpu": "1"}
    assert base.resources.requests == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}

    # Onto a GPU node of the right model, through its taint.
    assert pod.spec.node_selector == {"pool": "gpu"}
    term = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    (expr,) = term.node_selector_terms[0].match_expressions
    assert (expr.key, expr.operator) == ("nvidia.com/gpu.product", "In")
    assert expr.values == ["NVIDIA-A100-SXM4-80GB"]
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")]

    # /dev/shm in memory for data-loader workers, and the scratch/cache volume.
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["dshm"].empty_dir.medium == "Memory"
    assert volumes["dshm"].empty_dir.size_limit == "16Gi"
    assert volumes["scratch"].empty_dir.size_limit == "100Gi"
    mounts = {m.mount_path: m.name for m in base.volume_mounts}
    assert mounts["/dev/shm"] == "dshm" and mounts["/scratch"] == "scratch"
    assert mounts["/airflow/xcom"]  # the operator's XCom volume, read by its sidecar
    assert "airflow-xcom-sidecar" in [c.name for c in pod.spec.containers]

    # Plain settings by value; credentials only by secret name and key.
    env = {e.name: e for e in base.env}
    assert env["AWS_ENDPOINT_URL"].value == "http://minio.storage:9000"
    assert env["SD_PIPELINE_HOME"].value == "/scratch/sd-pipeline"
    for name, secret in [("AWS_ACCESS_KEY_ID", "sd-pipeline-s3"), ("AWS_SECRET_ACCESS_KEY", "sd-pipeline-s3"),
                         ("MLFLOW_TRACKING_PASSWORD", "sd-pipeline-mlflow")]:
        ref = env[name].value_from.secret_key_ref
        assert (env[name].value, ref.name, ref.key) == (None, secret, name)

    # Labels to find and cost the run's pods by.
    labels = pod.metadata.labels
    assert labels["sd-pipeline/run-id"] == RUN["run_id"]
    assert labels["sd-pipeline/dataset-version"] == RUN["dataset_version"]
    assert labels["sd-pipeline/dataset"] == "products"
    assert labels["app.kubernetes.io/component"] == "train"
    assert labels["team"] == "applied-ml"
    assert pod.metadata.annotations["sd-pipeline/config-uri"] == RUN["config_uri"]

    # Restricted pod security, the sidecar included.
    assert pod.spec.security_context.run_as_non_root is True
    for container in pod.spec.containers:
        assert container.security_context.allow_privilege_escalation is False
        assert container.security_context.capabilities.drop == ["ALL"]

    # The failing command's last lines become the termination message.
    assert base.termination_message_policy == "FallbackToLogsOnError"

    # How Airflow runs it: deferred while the pod runs, long enough to wait for a GPU node.
    assert op.deferrable is True
    assert op.do_xcom_push is True
    assert op.on_finish_action.value == "delete_succeeded_pod"
    assert op.schedule_timeout_seconds == 1800
    assert op.startup_timeout_seconds == 900
    assert (op.pool, op.pool_slots, op.retries) == ("gpu", 1, 2)

    # And it is a valid Pod, field by field.
    validate(as_json(pod), "V1Pod")


def test_a_multi_gpu_pod_runs_the_same_command_under_accelerate_launch() -> None:
    config = kube_config(**{"compute.train.gpus": 4, "compute.train.memory": "256Gi",
                            "compute.train.memory_limit": None, "compute.train.shm": "64Gi"})
    op, pod, _ = build_pod("train", config)
    base = base_container(pod)

    command = [*base.command, *base.args]
    stage = compute.stage_command("train", RUN["config_uri"], RUN["run_id"])
    assert command[:2] == ["accelerate", "launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert {"--multi_gpu", "--no_python"} <= set(command)
    assert command[command.index("--no_python") + 1:] == [*stage, "--result-file", compute.XCOM_RESULT_FILE]

    assert base.resources.limits["nvidia.com/gpu"] == "4"
    assert next(v for v in pod.spec.volumes if v.name == "dshm").empty_dir.size_limit == "64Gi"
    assert op.pool_slots == 4  # the pool counts GPUs, not pods
    validate(as_json(pod), "V1Pod")


def test_evaluate_has_its_own_resources_and_a_cpu_pod_asks_for_no_gpu() -> None:
    config = kube_config(**{"compute.evaluate.gpus": 0, "compute.evaluate.cpu": "2",
                            "compute.evaluate.memory": "8Gi", "compute.evaluate.shm": "1Gi",
                            "compute.kubernetes.scratch_claim": "sd-cache"})
    op, pod, _ = build_pod("evaluate", config)
    base = base_container(pod)
    assert base.args[:1] == ["evaluate"]
    assert base.resources.limits == {"cpu": "2", "memory": "8Gi"}
    assert pod.spec.affinity in (None, {}) or pod.spec.affinity.node_affinity is None
    scratch = next(v for v in pod.spec.volumes if v.name == "scratch")
    assert scratch.persistent_volume_claim.claim_name == "sd-cache"
    assert op.pool_slots == 1


def test_label_values_from_xcom_are_made_label_safe() -> None:
    long_name = "a" * 60 + "-x_"
    run = {**RUN, "run_id": f"{long_name}-0123456789ab", "dataset_version": "not/a label!"}
    _, pod, _ = build_pod("train", kube_config(name=long_name[:63].rstrip("_-")), run)
    for key, value in pod.metadata.labels.items():
        assert len(value) <= 63 and LABEL_VALUE.match(value), (key, value)
    assert pod.metadata.annotations["sd-pipeline/run-id"] == run["run_id"]  # the full value


def test_no_secret_value_reaches_the_pod_the_config_or_the_dag(monkeypatch: pytest.MonkeyPatch) -> None:
    # Credentials in the Airflow process's own environment stay there.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SENTINEL)
    config = kube_config()
    op, pod, _ = build_pod("train", config)
    assert SENTINEL not in json.dumps(as_json(pod))
    assert SENTINEL not in config.to_json()
    assert SENTINEL not in repr(op.env_vars)


def test_credentials_and_bad_kubernetes_values_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="use|secret_env"):
        kube_config(**{"compute.kubernetes.env": {"AWS_SECRET_ACCESS_KEY": "x"}})
    with pytest.raises(ConfigError, match="label"):
        kube_config(**{"compute.kubernetes.labels": {"team": "applied ml"}})
    with pytest.raises(ConfigError, match="shm"):
        kube_config(**{"compute.train.shm": "80Gi"})
    with pytest.raises(ConfigError, match="compute.kubernetes.namespace"):
        kube_config(**{"compute.kubernetes.namespace": "ML_Train"})
    with pytest.raises(ValueError, match="storage.root"):
        stage_pod_operator("train", kube_config(**{"storage.root": "file:///tmp/store"}))


# -- the same command on both backends --------------------------------------------------


def test_switching_backend_keeps_the_stage_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class FinishedProcess:
        def __init__(self, cmd: list[str], **_: Any) -> None:
            seen.append(cmd)
            Path(cmd[cmd.index("--result-file") + 1]).write_text('{"ok": true}')
            self.stdout: list[str] = []

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", FinishedProcess)
    for stage in ("train", "evaluate"):
        assert compute.run_local(stage, RUN["config_uri"], RUN["run_id"]) == {"ok": True}
        local = seen[-1]
        _, pod, _ = build_pod(stage, kube_config())
        in_pod = [*base_container(pod).command, *base_container(pod).args]
        stage_cmd = compute.stage_command(stage, RUN["config_uri"], RUN["run_id"])
        # Locally through this interpreter (`python -m sd_pipeline.cli`), in the pod as `sd-pipeline`.
        assert local[local.index("sd_pipeline.cli") + 1:local.index("--result-file")] == stage_cmd[1:]
        assert in_pod[:in_pod.index("--result-file")] == stage_cmd


# -- the operator's run: deferral, result, failure -----------------------------------------


class FakeCluster:
    """The answers of the Kubernetes API the operator asks for after the trigger fires."""

    def __init__(self, pod: k8s.V1Pod, exit_code: int, message: str | None, xcom: str) -> None:
        terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, message=message,
                                                    reason="Completed" if exit_code == 0 else "Error")
        self.pod = k8s.V1Pod(metadata=pod.metadata, spec=pod.spec, status=k8s.V1PodStatus(
            phase="Succeeded" if exit_code == 0 else "Failed",
            container_statuses=[k8s.V1ContainerStatus(
                name="base", image="img", image_id="", ready=False, restart_count=0,
                state=k8s.V1ContainerState(terminated=terminated))]))
        self.xcom = xcom
        self.deleted: list[str] = []

    def get_pod(self, name: str, namespace: str) -> k8s.V1Pod:
        return self.pod

    def read_pod(self, pod: k8s.V1Pod) -> k8s.V1Pod:
        return self.pod

    def await_pod_completion(self, pod: k8s.V1Pod, *_: Any, **__: Any) -> k8s.V1Pod:
        return self.pod

    def extract_xcom(self, pod: k8s.V1Pod, **_: Any) -> str:
        return self.xcom

    def delete_pod(self, pod: k8s.V1Pod) -> None:
        self.deleted.append(pod.metadata.name)


def attach(op: KubernetesPodOperator, cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    op.__dict__["hook"] = cluster  # cached properties of the operator
    op.__dict__["pod_manager"] = cluster
    monkeypatch.setattr(op, "_write_logs", lambda *a, **k: None)
    monkeypatch.setattr(op, "_read_pod_container_states", lambda *a, **k: None)
    monkeypatch.setattr(op, "_read_pod_events", lambda *a, **k: None)
    monkeypatch.setattr(op, "patch_already_checked", lambda *a, **k: None)


def event(pod: k8s.V1Pod, status: str) -> dict[str, Any]:
    return {"status": status, "name": pod.metadata.name, "namespace": pod.metadata.namespace,
            "message": "Container state failed" if status == "failed" else "done"}


def test_the_triggerer_follows_the_pod_with_the_scale_up_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                       json.dumps({"conn_type": "kubernetes", "extra": {"in_cluster": True}}))
    op, pod, _ = build_pod("train", kube_config())
    op.pod = pod
    with pytest.raises(TaskDeferred) as deferred:
        op.invoke_defer_method()
    trigger = deferred.value.trigger
    assert (trigger.pod_name, trigger.pod_namespace) == (pod.metadata.name, "ml-train")
    assert (trigger.schedule_timeout, trigger.startup_timeout) == (1800, 900)
    assert trigger.on_finish_action == "delete_succeeded_pod"


def test_a_finished_pod_returns_its_small_json_result_through_xcom(monkeypatch: pytest.MonkeyPatch) -> None:
    op, pod, context = build_pod("train", kube_config())
    result = {"run_id": RUN["run_id"], "final_uri": "s3://ml-bucket/sd/runs/x/final", "final_loss": 0.1}
    cluster = FakeCluster(pod, 0, None, json.dumps(result))
    attach(op, cluster, monkeypatch)
    assert op.trigger_reentry(context, event(pod, "success")) == result  # type: ignore[arg-type]
    assert cluster.deleted == [pod.metadata.name]


def test_a_failed_pod_puts_its_termination_message_in_the_task_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.common.compat.sdk import AirflowException

    op, pod, context = build_pod("train", kube_config())
    message = "sd-pipeline: s3://ml-bucket/sd/datasets/products/versions/0123 is not committed; ingest first"
    cluster = FakeCluster(pod, 1, message, "__airflow_xcom_result_empty__")
    attach(op, cluster, monkeypatch)
    monkeypatch.setattr(op, "_push_xcom_with_fan_out", lambda ti, value: None)
    with pytest.raises(AirflowException) as err:
        op.trigger_reentry(context, event(pod, "failed"))  # type: ignore[arg-type]
    assert message in str(err.value)
    assert cluster.deleted == []  # delete_succeeded_pod keeps the failed pod to inspect


# -- the DAG ------------------------------------------------------------------------------


def test_the_train_dag_runs_pods_per_step_without_changing_shape(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["storage"] = {"root": "s3://ml-bucket/sd"}
    config["compute"] = {"backend": "kubernetes", "evaluate": {"backend": "local"}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    for key, value in {"SD_PIPELINE_CONFIG": str(path), "AIRFLOW_HOME": str(home / "airflow"),
                       "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AWS_SECRET_ACCESS_KEY": SENTINEL}.items():
        monkeypatch.setenv(key, value)

    bag = DagBag(dag_folder=str(REPO / "dags" / "sd_train.py"))
    assert bag.import_errors == {}
    dag = bag.dags["sd_train"]
    train, evaluate = dag.get_task("train"), dag.get_task("evaluate")
    assert isinstance(train, StagePodOperator) and train.pool == "gpu"
    assert not isinstance(evaluate, KubernetesPodOperator)  # evaluate stays local, per step
    assert {t.task_id for t in train.upstream_list} == {"cache", "prepare_run"}
    assert {t.task_id for t in evaluate.upstream_list} == {"prepare_run", "train"}
    assert "evaluate" in {t.task_id for t in dag.get_task("register").upstream_list}

    serialized = json.dumps(DagSerialization.to_dict(dag), default=str)
    assert "ti.xcom_pull(task_ids='prepare_run')['run_id']" in serialized
    assert SENTINEL not in serialized
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SENTINEL


def test_parsing_the_dag_on_the_kubernetes_backend_loads_no_ml_stack(tmp_path: Path, home: Path) -> None:
    from test_dags import HEAVY, PROBE

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": "s3://ml-bucket/sd"},
                                      "compute": {"backend": "kubernetes"}}))
    env = {**os.environ, "SD_PIPELINE_CONFIG": str(config), "AIRFLOW_HOME": str(home / "airflow"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags" / "sd_train.py"), json.dumps(HEAVY)],
                         capture_output=True, text=True, env=env, cwd=REPO, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    # boto3/botocore are Airflow's own for an s3:// Asset (see test_dags); the rest is ours to keep out.
    assert loaded <= {"boto3", "botocore"}, f"the KubernetesPodOperator DAG pulls in {sorted(loaded)}"
