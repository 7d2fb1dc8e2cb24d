"""The pod of a heavy stage: a KubernetesPodOperator built from the ``compute`` config.

The pod runs the very command the local backend runs (``compute.pod_command``). Its run id
and config URI come from the ``prepare_run`` task's XCom when the task runs, so a retry
resumes the same run; its credentials come from Kubernetes secrets by name and key, so no
secret value ever passes through Airflow. Import this module only for the kubernetes
backend: it loads the Kubernetes client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.pod_generator import make_safe_label_value
from kubernetes.client import models as k8s

from sd_pipeline.compute import pod_command

if TYPE_CHECKING:
    from airflow.sdk import Context

    from sd_pipeline.config import KubernetesConfig, PipelineConfig, StepCompute

SCRATCH = "/scratch"
LABEL_PREFIX = "sd-pipeline"
# Non-root, matching the user of docker/train.Dockerfile; fsGroup makes the volumes writable.
UID = 1000


def run_field(field: str, run_task_id: str = "prepare_run") -> str:
    """A template for one field of the ``prepare_run`` result, rendered when the task runs."""
    return f"{{{{ ti.xcom_pull(task_ids='{run_task_id}')['{field}'] }}}}"


class StagePodOperator(KubernetesPodOperator):
    """A KubernetesPodOperator whose label values are made label-safe after templating.

    Run ids and dataset versions arrive through XCom templates, so their labels can only be
    sanitized once rendered; the operator's own request builder does the rest.
    """

    def __init__(self, *, stage: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        self.labels = {key: make_safe_label_value(str(value)) for key, value in self.labels.items()}
        if not dry_run:  # a dry run (DAG checks, tests) has no stored run config to read
            self._shape_for_run()
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def _shape_for_run(self) -> None:
        """GPUs, resources and command from the run's resolved config (the form's GPU count included).

        The DAG is parsed with the pipeline config's defaults; a run may ask for another GPU
        count, which only its stored config knows once ``prepare_run`` has written it.
        """
        args = list(self.arguments or [])
        if not self.stage or "--config" not in args or "--run-id" not in args:
            return
        uri, run_id = args[args.index("--config") + 1], args[args.index("--run-id") + 1]
        if "{{" in uri or "{{" in run_id:  # not rendered yet (a dry run of the DAG file)
            return
        from sd_pipeline.stages import load_config_uri

        config = load_config_uri(uri)
        kube = config.compute.kubernetes
        step = config.compute.step("evaluate" if self.stage == "reevaluate" else self.stage)
        command = pod_command(self.stage, uri, run_id, step.gpus)
        self.cmds, self.arguments = command[:1], command[1:]
        self.container_resources = pod_resources(step, kube)
        self.affinity = gpu_affinity(step, kube)


def stage_pod_operator(
    stage: str, config: PipelineConfig, *, run_task_id: str = "prepare_run", **kwargs: Any
) -> StagePodOperator:
    """The task that runs ``sd-pipeline <stage>`` in a pod on the cluster of ``compute.kubernetes``."""
    if not config.storage.root.startswith("s3://"):
        raise ValueError(
            f"compute.{stage}.backend is kubernetes but storage.root is {config.storage.root!r}: a pod "
            "cannot read this machine's files; set storage.root to s3://bucket/prefix (or run "
            f"compute.{stage}.backend=local)"
        )
    kube = config.compute.kubernetes
    step = config.compute.step("evaluate" if stage == "reevaluate" else stage)  # sd_reevaluate's pod
    command = pod_command(
        stage, run_field("config_uri", run_task_id), run_field("run_id", run_task_id), step.gpus
    )
    return StagePodOperator(
        task_id=stage,
        name=f"sd-{stage}",
        kubernetes_conn_id=kube.connection_id,
        namespace=kube.namespace,
        service_account_name=kube.service_account,
        automount_service_account_token=False,  # the pod never talks to the Kubernetes API
        image=kube.image,
        image_pull_policy=kube.image_pull_policy,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=name) for name in kube.image_pull_secrets],
        cmds=command[:1],
        arguments=command[1:],
        env_vars=pod_env(kube, config.storage.endpoint_url),
        container_resources=pod_resources(step, kube),
        volumes=pod_volumes(step, kube),
        volume_mounts=[
            k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH),
        ],
        node_selector=dict(kube.node_selector),
        affinity=gpu_affinity(step, kube),
        tolerations=[
            k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            for t in kube.tolerations
        ],
        priority_class_name=kube.priority_class,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=UID,
            run_as_group=UID,
            fs_group=UID,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        # Both containers, so the pod passes the "restricted" Pod Security Standard.
        container_security_context=_container_security(),
        xcom_sidecar_container_security_context=_container_security(),
        labels=pod_labels(stage, config, run_task_id),
        annotations={
            f"{LABEL_PREFIX}/run-id": run_field("run_id", run_task_id),
            f"{LABEL_PREFIX}/config-uri": run_field("config_uri", run_task_id),
        },
        # Results come back as the small JSON the command writes to compute.XCOM_RESULT_FILE.
        do_xcom_push=True,
        deferrable=True,
        poll_interval=15,
        on_finish_action=kube.on_finish_action,
        schedule_timeout_seconds=kube.schedule_timeout_seconds,
        startup_timeout_seconds=kube.startup_timeout_seconds,
        active_deadline_seconds=kube.active_deadline_seconds,
        # The failing command's last log lines become the pod's termination message, and the
        # operator puts that message into the task's error.
        termination_message_policy="FallbackToLogsOnError",
        log_events_on_failure=True,
        log_pod_spec_on_failure=False,
        get_logs=True,
        pool=kube.pool,
        pool_slots=max(1, step.gpus),
        retries=kube.retries,  # delay and backoff: the DAG's default args (settings.DEFAULT_ARGS)
        stage=stage,
        **kwargs,
    )


def _container_security() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"])
    )


def pod_labels(stage: str, config: PipelineConfig, run_task_id: str = "prepare_run") -> dict[str, str]:
    """Labels to find and cost a run's pods by (values are made label-safe when the pod is built)."""
    return {
        **config.compute.kubernetes.labels,
        "app.kubernetes.io/name": "sd-pipeline",
        "app.kubernetes.io/component": stage,
        f"{LABEL_PREFIX}/pipeline": config.name,
        f"{LABEL_PREFIX}/dataset": config.dataset.name,
        f"{LABEL_PREFIX}/dataset-version": run_field("dataset_version", run_task_id),
        f"{LABEL_PREFIX}/run-id": run_field("run_id", run_task_id),
    }


def pod_env(kube: KubernetesConfig, endpoint_url: str | None) -> list[k8s.V1EnvVar]:
    """Plain settings by value; credentials only as references to Kubernetes secrets."""
    plain = {
        "PYTHONUNBUFFERED": "1",
        # Base-model and Hugging Face caches live on the scratch volume.
        "SD_PIPELINE_HOME": f"{SCRATCH}/sd-pipeline",
        "HF_HOME": f"{SCRATCH}/huggingface",
        **({"AWS_ENDPOINT_URL": endpoint_url} if endpoint_url else {}),
        **kube.env,
    }
    env = [k8s.V1EnvVar(name=name, value=value) for name, value in plain.items()]
    env += [
        k8s.V1EnvVar(
            name=ref.env,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=ref.secret, key=ref.key, optional=ref.optional)
            ),
        )
        for ref in kube.secret_env
    ]
    return env


def pod_resources(step: StepCompute, kube: KubernetesConfig) -> k8s.V1ResourceRequirements:
    gpus = {kube.gpu_resource: str(step.gpus)} if step.gpus else {}
    return k8s.V1ResourceRequirements(
        requests={"cpu": step.cpu, "memory": step.memory, **gpus},
        limits={"cpu": step.cpu_limit or step.cpu, "memory": step.memory_limit or step.memory, **gpus},
    )


def pod_volumes(step: StepCompute, kube: KubernetesConfig) -> list[k8s.V1Volume]:
    """A RAM-backed /dev/shm for data-loader workers, and the scratch/cache volume."""
    scratch = (
        k8s.V1Volume(
            name="scratch",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=kube.scratch_claim),
        )
        if kube.scratch_claim
        else k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=kube.scratch_size))
    )
    return [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=step.shm)),
        scratch,
    ]


def gpu_affinity(step: StepCompute, kube: KubernetesConfig) -> k8s.V1Affinity | None:
    """Require a node whose GPU model is one of ``gpu_types`` (none: any node that fits)."""
    if not step.gpu_types or not step.gpus:
        return None
    return k8s.V1Affinity(
        node_affinity=k8s.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(
                node_selector_terms=[
                    k8s.V1NodeSelectorTerm(
                        match_expressions=[
                            k8s.V1NodeSelectorRequirement(
                                key=kube.gpu_type_label, operator="In", values=list(step.gpu_types)
                            )
                        ]
                    ),
                ]
            ),
        )
    )
