"""The Kubernetes deployment: deploy/ config is valid and train_gpu's pods request a GPU in the `gpu` pool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher, k8s_job_executor

from tests.ops.conftest import REPO_ROOT
from tests.ops.k8s_render import (
    build_launcher,
    execution_steps,
    gpu_limit,
    launch_run_pod,
    render_step_pod,
    write_unreachable_kubeconfig,
)

K8S_DEPLOY_DIR = REPO_ROOT / "deploy" / "k8s"
TRAINED_MODEL = dg.AssetKey("trained_model")


def deploy_run_launcher_config() -> dict[str, Any]:
    config, _ = dagster_instance_config(str(K8S_DEPLOY_DIR))
    return config["run_launcher"]["config"]


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    return write_unreachable_kubeconfig(tmp_path / "kubeconfig")


def test_instance_yaml_launches_runs_with_k8s_run_launcher_on_postgres() -> None:
    config, _ = dagster_instance_config(str(K8S_DEPLOY_DIR))  # raises on any schema error

    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    launcher_config = validate_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert launcher_config.success, launcher_config.errors
    assert "postgres" in config["storage"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_helm_values_use_k8s_run_launcher_and_load_the_pipeline_code_location() -> None:
    values = yaml.safe_load((K8S_DEPLOY_DIR / "values.yaml").read_text())

    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", workspace["load_from"][0]["python_module"]]


def test_train_gpu_run_pod_requests_one_gpu(instance: dg.DagsterInstance, kubeconfig: Path) -> None:
    launcher, batch_api = build_launcher(deploy_run_launcher_config(), kubeconfig)

    namespace, job = launch_run_pod(launcher, batch_api, instance, "train_gpu")

    assert namespace == "segpipe"
    assert gpu_limit(job) == "1"
    container = job.spec.template.spec.containers[0]
    assert any(env.name == "DAGSTER_PG_PASSWORD" for env in container.env)
    assert [mount.mount_path for mount in container.volume_mounts] == ["/data"]
    assert job.metadata.labels["dagster/job"] == "train_gpu"


def test_train_cpu_run_pod_requests_no_gpu(instance: dg.DagsterInstance, kubeconfig: Path) -> None:
    launcher, batch_api = build_launcher(deploy_run_launcher_config(), kubeconfig)

    _, job = launch_run_pod(launcher, batch_api, instance, "train_cpu")

    assert gpu_limit(job) is None


def test_train_gpu_training_step_is_in_the_gpu_pool() -> None:
    steps = {step.key: step for step in execution_steps("train_gpu")}

    assert list(steps) == [TRAINED_MODEL.to_python_identifier()]
    assert steps[TRAINED_MODEL.to_python_identifier()].pool == "gpu"


def test_k8s_job_executor_config_gives_only_the_training_step_pod_a_gpu(
    instance: dg.DagsterInstance, kubeconfig: Path
) -> None:
    run_config = yaml.safe_load((K8S_DEPLOY_DIR / "train_gpu.k8s_job_executor.yaml").read_text())
    executor_config = validate_config(k8s_job_executor.config_schema.config_type, run_config["execution"]["config"])
    assert executor_config.success, executor_config.errors
    launcher, _ = build_launcher(deploy_run_launcher_config(), kubeconfig)

    pods = {
        job_name: {
            step.key: render_step_pod(launcher, instance, job_name, step, executor_config.value)
            for step in execution_steps(job_name)
        }
        for job_name in ("train_gpu", "build_shards")
    }

    training_pod = pods["train_gpu"][TRAINED_MODEL.to_python_identifier()]
    assert gpu_limit(training_pod) == "1"
    assert training_pod.spec.template.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [gpu_limit(pod) for pod in pods["build_shards"].values()] == [None] * len(pods["build_shards"])
