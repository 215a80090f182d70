"""Render the Kubernetes Jobs that dagster-k8s would submit, without a cluster.

The run pod goes through K8sRunLauncher.launch_run itself, with the Kubernetes batch API replaced by a
recorder; a step pod is built the way k8s_job_executor's step handler builds it (the run's container
context without job-level tags, then the executor config, the step's own `dagster-k8s/config` tag and
the executor's `per_step_k8s_config` entry for the op).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import dagster as dg
import kubernetes.client
import yaml
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.plan.step import ExecutionStep
from dagster._core.launcher import LaunchRunContext
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_k8s_job_name,
    get_user_defined_k8s_config,
)

DEFINITIONS_MODULE = "pipeline.definitions"
IMAGE = "segpipe:test"


class RecordingBatchApi:
    """Stands in for kubernetes.client.BatchV1Api: keeps the Jobs instead of sending them."""

    def __init__(self) -> None:
        self.created: list[tuple[str, kubernetes.client.V1Job]] = []

    def create_namespaced_job(self, body: kubernetes.client.V1Job, namespace: str, **_: Any) -> None:
        self.created.append((namespace, body))


def write_unreachable_kubeconfig(path: Path) -> Path:
    """A kubeconfig that parses but points nowhere: the launcher loads it; nothing may dial it."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "none", "user": {"token": "unused"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    return path


def definitions_attribute(module_name: str = DEFINITIONS_MODULE) -> str:
    """Name of the module-level dg.Definitions object, which is what the code location loads."""
    module = importlib.import_module(module_name)
    names = [name for name, value in vars(module).items() if isinstance(value, dg.Definitions)]
    if len(names) != 1:
        raise AssertionError(f"{module_name} should hold exactly one Definitions object, found {names}")
    return names[0]


def reconstructable_job(job_name: str) -> ReconstructableJob:
    repository = ReconstructableRepository.for_module(
        DEFINITIONS_MODULE, definitions_attribute(), container_image=IMAGE
    )
    return repository.get_reconstructable_job(job_name)


def build_launcher(launcher_config: dict[str, Any], kubeconfig: Path) -> tuple[K8sRunLauncher, RecordingBatchApi]:
    """K8sRunLauncher from a deploy/ run_launcher config, loading `kubeconfig` instead of in-cluster config."""
    batch_api = RecordingBatchApi()
    config = {**launcher_config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    return K8sRunLauncher(**config, k8s_client_batch_api=batch_api), batch_api


def launch_run_pod(
    launcher: K8sRunLauncher, batch_api: RecordingBatchApi, instance: dg.DagsterInstance, job_name: str
) -> tuple[str, kubernetes.client.V1Job]:
    """Launch one run of `job_name` the way the webserver/daemon does (job run tags on the run)."""
    launcher.register_instance(instance)
    recon_job = reconstructable_job(job_name)
    job_def = recon_job.get_definition()
    run = instance.create_run_for_job(
        job_def=job_def, tags=job_def.run_tags, job_code_origin=recon_job.get_python_origin()
    )
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    return batch_api.created[-1]


def execution_steps(job_name: str) -> list[ExecutionStep]:
    return list(create_execution_plan(reconstructable_job(job_name)).steps)


def render_step_pod(
    launcher: K8sRunLauncher,
    instance: dg.DagsterInstance,
    job_name: str,
    step: ExecutionStep,
    executor_config: dict[str, Any],
) -> kubernetes.client.V1Job:
    """The Job k8s_job_executor submits for `step`, merged in K8sStepHandler's order.

    Run context from the launcher (job-level tags excluded, as the executor does) <- executor config
    <- the step's `dagster-k8s/config` tag <- `per_step_k8s_config[op name]`.
    """
    job_def = reconstructable_job(job_name).get_definition()
    run = instance.create_run_for_job(job_def=job_def, tags=job_def.run_tags)
    executor_context = K8sContainerContext(
        image_pull_policy=executor_config.get("image_pull_policy"),
        env_config_maps=executor_config.get("env_config_maps"),
        volume_mounts=executor_config.get("volume_mounts"),
        volumes=executor_config.get("volumes"),
        namespace=executor_config.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor_config.get("step_k8s_config", {})),
    )
    per_op = executor_config.get("per_step_k8s_config", {}).get(step.op_name, {})
    context = (
        K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
        .merge(executor_context)
        .merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags)))
        .merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(per_op)))
    )
    job_config = context.get_k8s_job_config(job_image=IMAGE, run_launcher=launcher)
    job_name = f"dagster-step-{get_k8s_job_name(run.run_id, step.key)}"
    return construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name=job_name,
        pod_name=job_name,
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
    )


def gpu_limit(job: kubernetes.client.V1Job) -> str | None:
    """The `nvidia.com/gpu` limit of the Job's dagster container, as Kubernetes will read it."""
    resources = job.spec.template.spec.containers[0].resources
    limits = (resources.limits if resources else None) or {}
    value = limits.get("nvidia.com/gpu")
    return None if value is None else str(value)
