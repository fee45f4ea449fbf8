"""The container images and Kubernetes manifests are files that nothing here builds or applies: every
path, module, extra and field they name is checked against the repository, and the TPU work pool's
base job template is created on a real server and rendered by Prefect's Kubernetes worker."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"Dockerfile": "encode,score", "Dockerfile.tpu": "denoise,decode"}
CACHE_VARIABLES = ("STAGEDIFF_MODEL_CACHE", "STAGEDIFF_COMPILE_CACHE", "STAGEDIFF_DIGEST_CACHE")
JOB_TEMPLATE = PROJECT / "deploy" / "prefect" / "tpu-pool-job-template.json"
STAGES = {"encode", "denoise", "decode", "score"}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (PROJECT / dockerfile).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def arguments(dockerfile: str) -> dict[str, str]:
    return dict(value.split("=", 1) for name, value in instructions(dockerfile) if name == "ARG")


def module_exists(module: str) -> bool:
    path = PROJECT / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def extras() -> dict:
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def locked_version(package: str) -> str:
    for line in (PROJECT / "requirements.lock").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{package} is not in requirements.lock")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_copies_files_that_exist(dockerfile):
    copies = [shlex.split(value) for name, value in instructions(dockerfile) if name == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (PROJECT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
    copied = {source for *sources, _ in copies for source in sources}
    # what `pip install -e .` needs: the packages pyproject names and the files it reads
    assert {"pyproject.toml", "requirements.lock", "README.md", "stagediff", "tpu_ops", "flows", "tasks"} <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_from_the_lock_with_existing_extras(dockerfile):
    runs = " ".join(value for name, value in instructions(dockerfile) if name == "RUN")
    assert "-c requirements.lock -e" in runs
    for extra in arguments(dockerfile)["EXTRAS"].split(","):
        assert extra in extras(), f"{dockerfile} installs the extra {extra!r}, which pyproject does not define"
    torch = re.search(r"torch==(\S+)", runs).group(1)
    assert locked_version("torch").split("+")[0] == torch
    assert runs.index("torch==") < runs.index("-c requirements.lock"), "the CPU torch wheel must come first"


def test_tpu_image_has_the_tpu_extra_and_the_cpu_image_the_kubernetes_worker():
    assert arguments("Dockerfile.tpu")["EXTRAS"] == "tpu"
    assert "kubernetes" in arguments("Dockerfile")["EXTRAS"].split(",")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_a_stage_worker_as_a_user_with_caches_on_a_volume(dockerfile):
    steps = instructions(dockerfile)
    users = [value for name, value in steps if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert not any(name == "ENTRYPOINT" for name, _ in steps)  # Kubernetes and Prefect's jobs replace the CMD
    command = json.loads([value for name, value in steps if name == "CMD"][-1])
    assert command[:2] == ["python", "-m"] and module_exists(command[2])
    assert command[3:] == ["--stages", DOCKERFILES[dockerfile]]
    env = " ".join(value for name, value in steps if name == "ENV")
    volumes = [path for name, value in steps if name == "VOLUME" for path in json.loads(value)]
    for variable in CACHE_VARIABLES:
        folder = re.search(rf"{variable}=(\S+)", env).group(1)
        assert any(folder.startswith(volume + "/") for volume in volumes), f"{variable}={folder} is on no volume"
    assert "PATH=/app/.venv/bin:$PATH" in env


def manifests() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted((PROJECT / "deploy").glob("*.yaml"))}


def deployments() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for docs in manifests().values() for doc in docs if doc["kind"] == "Deployment"}


def defined(kind: str) -> set[str]:
    return {doc["metadata"]["name"] for docs in manifests().values() for doc in docs if doc["kind"] == kind}


def test_every_manifest_loads_and_lives_in_the_namespace_it_creates():
    found = manifests()
    assert set(found) >= {"config.yaml", "encode-workers.yaml", "tpu-workers.yaml", "tpu-pool-worker.yaml"}
    assert sorted(found)[0] == "config.yaml" and found["config.yaml"][0]["kind"] == "Namespace"
    namespace = found["config.yaml"][0]["metadata"]["name"]
    for name, docs in found.items():
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"], name
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace, f"{name}: {doc['metadata']['name']}"


def test_deployments_refer_to_what_exists():
    service_accounts, config_maps = defined("ServiceAccount"), defined("ConfigMap")
    for name, deployment in deployments().items():
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items(), name
        pod = spec["template"]["spec"]
        assert pod["serviceAccountName"] in service_accounts, name
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, name
            command = " ".join(container["command"])
            for module in re.findall(r"python -m (\S+)", command):
                assert module_exists(module), f"{name} runs python -m {module}, which does not exist"


def test_encode_workers_serve_encode_and_score_on_the_cpu_image():
    [container] = deployments()["stagediff-encode-workers"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "tasks.worker", "--stages", "encode,score"]
    assert container["image"].endswith("/stagediff:latest")
    assert "google.com/tpu" not in json.dumps(container["resources"])


def test_tpu_workers_serve_denoise_and_decode_on_tpu_nodes():
    pod = deployments()["stagediff-tpu-workers"]["spec"]["template"]["spec"]
    assert set(pod["nodeSelector"]) == {"cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology"}
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
    assert re.fullmatch(r"\d+x\d+(x\d+)?", pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"])
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "tasks.worker", "--stages", "denoise,decode"]
    assert set(container["command"][-1].split(",")) <= STAGES
    assert container["image"].endswith("/stagediff-tpu:latest")
    chips = container["resources"]["requests"]["google.com/tpu"]
    assert chips == container["resources"]["limits"]["google.com/tpu"] and chips > 0


def test_the_kubernetes_worker_may_create_jobs():
    pod = deployments()["stagediff-tpu-pool-worker"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][:5] == ["prefect", "worker", "start", "--pool", "tpu-pool"]
    role = next(doc for docs in manifests().values() for doc in docs if doc["kind"] == "Role")
    binding = next(doc for docs in manifests().values() for doc in docs if doc["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {subject["name"] for subject in binding["subjects"]} == {pod["serviceAccountName"]}
    jobs = next(rule for rule in role["rules"] if "jobs" in rule["resources"])
    assert {"create", "watch", "delete"} <= set(jobs["verbs"])


def test_job_template_places_jobs_on_tpu_nodes_with_the_tpu_image():
    template = json.loads(JOB_TEMPLATE.read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "{{ tpu_accelerator }}",
                                   "cloud.google.com/gke-tpu-topology": "{{ tpu_topology }}"}
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["google.com/tpu"] == resources["limits"]["google.com/tpu"] == "{{ tpu_chips }}"
    variables = template["variables"]["properties"]
    assert variables["image"]["default"].endswith("/stagediff-tpu:latest")
    assert {"tpu_accelerator", "tpu_topology", "tpu_chips"} <= set(variables)


def test_job_template_extends_prefects_default_kubernetes_template(prefect_stack):
    default = json.loads(prefect_stack.prefect("work-pool", "get-default-base-job-template", "--type",
                                               "kubernetes").stdout)
    ours = json.loads(JOB_TEMPLATE.read_text())
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(default["job_configuration"]) == set(ours["job_configuration"])
    default_container = default["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    our_container = ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert {key: value for key, value in our_container.items() if key in default_container and key != "resources"} == \
        {key: value for key, value in default_container.items() if key != "resources"}


def test_tpu_work_pool_is_created_from_the_template(prefect_stack):
    name = f"tpu-pool-{uuid.uuid4().hex[:8]}"
    created = prefect_stack.prefect("work-pool", "create", name, "--type", "kubernetes", "--base-job-template",
                                    str(JOB_TEMPLATE), check=False)
    assert created.returncode == 0, created.stdout + created.stderr
    try:
        inspected = prefect_stack.prefect("work-pool", "inspect", name, "--output", "json")
        pool = json.loads(inspected.stdout)
        assert pool["type"] == "kubernetes"
        ours = json.loads(JOB_TEMPLATE.read_text())
        assert pool["base_job_template"]["job_configuration"] == ours["job_configuration"]
        variables = pool["base_job_template"]["variables"]["properties"]
        for variable in ("image", "tpu_accelerator", "tpu_topology", "tpu_chips", "pod_watch_timeout_seconds"):
            assert variables[variable]["default"] == ours["variables"]["properties"][variable]["default"]
    finally:
        prefect_stack.prefect("work-pool", "delete", name)
    assert prefect_stack.prefect("work-pool", "inspect", name, check=False).returncode != 0


def test_kubernetes_worker_renders_a_tpu_job(prefect_client):
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(JOB_TEMPLATE.read_text())

    async def render(values):
        configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
        configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="red-fox"))
        return configuration.job_manifest

    manifest = asyncio.run(render({"command": "python -m prefect.engine", "tpu_topology": "2x2x1", "tpu_chips": 4}))
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x1"}
    [container] = pod["containers"]
    assert container["args"] == ["python", "-m", "prefect.engine"]
    assert container["resources"] == {"requests": {"google.com/tpu": 4}, "limits": {"google.com/tpu": 4}}
    assert container["image"].endswith("/stagediff-tpu:latest")
    assert pod["serviceAccountName"] == "stagediff" and manifest["metadata"]["namespace"] == "stagediff"
