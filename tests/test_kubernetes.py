"""examples/kubernetes, checked as far as it can be without a cluster: the PyTorchJob against the
training operator's own schema (its CRD, vendored in tests/data) and its admission webhook's
checks, the volumes it mounts, the script its pods run (with a fake torchrun), and the image's torch
against the tested one."""

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from jsonschema.exceptions import ValidationError
from torch.distributed.run import get_args_parser

from retinaperf.cli import build_parser

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "kubernetes"
JOB_FILE = EXAMPLE / "pytorchjob-2x8.yaml"
VOLUMES_FILE = EXAMPLE / "volumes.yaml"
CRD_FILE = Path(__file__).parent / "data" / "kubeflow.org_pytorchjobs.yaml"
# The git blob of manifests/base/crds/kubeflow.org_pytorchjobs.yaml at kubeflow/training-operator
# v1.9.0; the operator's code cited below (file:line) is of that tag too.
CRD_BLOB = "1f8c8bc8734bc81bc525bd86e8ee8a6423fadba3"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # pkg/apis/kubeflow.org/v1/common_types.go:34
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml reads the 600 kB CRD in 0.1 s


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc is not None]


def _job() -> dict:
    (job,) = _documents(JOB_FILE)
    return job


def _container(job: dict, replica: str = "Master") -> dict:
    (container,) = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    return container


# The CRD's schema as the API server applies it ----------------------------------------------


def _structural(schema: dict) -> dict:
    """An OpenAPI v3 schema of a CRD as a JSON Schema with Kubernetes' meaning of it: a field the
    schema does not know is an error, as under kubectl's default field validation (strict; the
    API server would otherwise drop it silently), and `x-kubernetes-int-or-string` takes either."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _structural(s) for name, s in out["properties"].items()}
        open_ended = out.get("x-kubernetes-preserve-unknown-fields")
        if "additionalProperties" not in out and not open_ended:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    if "items" in out:
        out["items"] = _structural(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_structural(s) for s in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: the items of a `map` list are unique by their
    `x-kubernetes-list-map-keys` (a key left out counts as its default), a `set`'s items are."""
    if list_type not in ("map", "set") or not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema["x-kubernetes-list-map-keys"]
        fields = schema["items"].get("properties", {})
        seen = [
            tuple(item.get(key, fields.get(key, {}).get("default")) for key in keys)
            for item in instance
        ]
    else:
        keys, seen = "the whole item", [json.dumps(item, sort_keys=True) for item in instance]
    repeated = sorted({str(s) for s in seen if seen.count(s) > 1})
    if repeated:
        yield ValidationError(f"list-type {list_type}: items repeat {keys}: {repeated}")


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)


@cache
def _crd_schema() -> dict:
    (crd,) = _documents(CRD_FILE)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


def _schema_errors(instance: dict, schema: dict) -> list[str]:
    validator = Validator(_structural(schema), format_checker=FORMATS)
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(instance)
    )


def _cel_rules(node: object) -> list[str]:
    """Every `x-kubernetes-validations` rule (CEL) in a schema."""
    if isinstance(node, list):
        return [rule for item in node for rule in _cel_rules(item)]
    if not isinstance(node, dict):
        return []
    own = [v["rule"] for v in node.get("x-kubernetes-validations", [])]
    return own + [rule for key, value in node.items() for rule in _cel_rules(value)]


# The operator's admission webhook --------------------------------------------------------------


def _generated_name(generate_name: str) -> str:
    """The name the API server gives an object with this generateName (before the validating
    webhooks see it): the prefix cut to 58 characters, then 5 random ones from
    "bcdfghjklmnpqrstvwxz2456789" (k8s.io/apiserver pkg/storage/names/generate.go)."""
    return generate_name[:58] + "x7b2z"


def _webhook_errors(job: dict) -> list[str]:
    """What the training operator's validating webhook refuses, as it checks it: its
    validatePyTorchJob (pkg/webhooks/pytorch/pytorchjob_webhook.go), line by line."""
    errors = []
    meta, spec = job["metadata"], job["spec"]
    name = meta.get("name") or _generated_name(meta["generateName"])
    if len(name) > 63 or not DNS1035_LABEL.fullmatch(name):  # :80 NameIsDNS1035Label
        errors.append(f"metadata.name {name!r}: not a DNS-1035 label")
    managed_by = spec.get("runPolicy", {}).get("managedBy")  # pkg/common/util/webhooks.go:11-25
    if managed_by not in (None, "kueue.x-k8s.io/multikueue", "kubeflow.org/training-operator"):
        errors.append(f"spec.runPolicy.managedBy {managed_by!r}: not supported")
    replicas = spec.get("pytorchReplicaSpecs")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in (replicas or {}):  # :96-101
            errors.append("Worker: must be configured if elastic policy is used")
        # :102-108
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            errors.append("elasticPolicy.nProcPerNode: must not be used with nprocPerNode")
    if replicas is None:  # :118-120
        errors.append("pytorchReplicaSpecs: must be required")
    for rtype, rspec in (replicas or {}).items():
        if rtype not in ("Master", "Worker"):  # :126-132
            errors.append(f"{rtype}: not a supported replica type")
        containers = ((rspec or {}).get("template") or {}).get("spec", {}).get("containers") or []
        if not containers:  # :134-136
            errors.append(f"{rtype}: containers must be specified")
        for container in containers:  # :140-143
            if not container.get("image"):
                errors.append(f"{rtype}: container {container.get('name')}: image must be required")
        if "pytorch" not in [c.get("name") for c in containers]:  # :148-151
            errors.append(f'{rtype}: must have at least one container with name "pytorch"')
        count = (rspec or {}).get("replicas")
        if rtype == "Master" and count != 1:  # :152-155
            errors.append(f"{rtype}.replicas: must be 1")
        elif rtype != "Master" and count is not None and count < 1:  # :156-158
            errors.append(f"{rtype}.replicas: must be at least 1")
    return errors


# The vendored schema, and the job against it -----------------------------------------------------


def test_the_vendored_crd_is_the_operators_file_verbatim():
    raw = CRD_FILE.read_bytes()
    body = raw[raw.index(b"\n---\n") + 1 :]
    blob = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
    assert blob == CRD_BLOB, "tests/data/kubeflow.org_pytorchjobs.yaml differs from the operator's"
    # The only CEL rule of the schema is a transition rule (on update), which no create meets: a
    # newer CRD with other rules needs them checked here.
    assert _cel_rules(_crd_schema()) == ["self == oldSelf"]


def test_the_job_matches_the_operators_crd_schema():
    job = _job()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert _schema_errors(job, _crd_schema()) == []


def test_the_schema_check_refuses_what_the_api_server_refuses():
    """The check is not vacuous: a misspelt field, a wrong type, an integer out of range, a repeated
    key of a list-map are each found."""
    job = _job()
    bad = copy.deepcopy(job)
    bad["spec"]["nProcPerNodes"] = "8"
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    bad["spec"]["elasticPolicy"]["maxRestarts"] = 2**31
    container = _container(bad, "Worker")  # the Master's too: one template (a YAML alias)
    container["env"].append(dict(container["env"][-1]))
    errors = _schema_errors(bad, _crd_schema())
    assert len(errors) == 5, errors
    assert any("'nProcPerNodes' was unexpected" in e for e in errors)
    assert any(e.startswith("spec.pytorchReplicaSpecs.Worker.replicas:") for e in errors)
    assert any(e.startswith("spec.elasticPolicy.maxRestarts:") for e in errors)
    for replica in ("Master", "Worker"):
        path = f"spec.pytorchReplicaSpecs.{replica}.template.spec.containers.0.env: list-type map"
        assert any(e.startswith(path) and "NCCL_DEBUG" in e for e in errors)


def test_the_job_passes_the_operators_webhook():
    job = _job()
    assert "name" not in job["metadata"], "a fixed name: a job created again would reuse its runs"
    assert _webhook_errors(job) == []
    bad = copy.deepcopy(job)
    bad["metadata"]["generateName"] = "RetinaPerf-"
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    _container(bad)["name"] = "main"  # the Worker shares the Master's template (YAML alias)
    assert len(_webhook_errors(bad)) == 4


def test_pods_are_started_again_and_a_failing_job_stops():
    """restartPolicy OnFailure: the operator re-creates a deleted pod and a failed one
    (pkg/controller.v1/common/pod.go:316-322, 350-366), Kubernetes restarts a container that
    exited non-zero, and backoffLimit counts those restarts (pkg/core/job.go:95-133)."""
    spec = _job()["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    # The operator's restart policies: pkg/apis/kubeflow.org/v1/common_types.go:179-188.
    assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}
    assert spec["runPolicy"]["backoffLimit"] > 0
    elastic = spec["elasticPolicy"]
    # torchrun's --nnodes is elasticPolicy's min:max (pkg/controller.v1/pytorch/elastic.go): the
    # rendezvous waits for every pod, Master and Worker.
    nodes = sum(r["replicas"] for r in replicas.values())
    assert elastic["minReplicas"] == elastic["maxReplicas"] == nodes == 2
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] > 0


def test_the_volumes_are_read_write_many_claims_defined_beside_the_job():
    """Both pods mount the volumes at once, on two nodes: each claim the job names is defined in
    volumes.yaml, ReadWriteMany, its spec valid against the PersistentVolumeClaimSpec schema the
    CRD embeds (ephemeral volumes' volumeClaimTemplate)."""
    claims = {doc["metadata"]["name"]: doc for doc in _documents(VOLUMES_FILE)}
    pod_schema = _crd_schema()["properties"]["spec"]["properties"]["pytorchReplicaSpecs"][
        "additionalProperties"
    ]["properties"]["template"]["properties"]["spec"]
    claim_schema = pod_schema["properties"]["volumes"]["items"]["properties"]["ephemeral"][
        "properties"
    ]["volumeClaimTemplate"]["properties"]["spec"]
    for name, claim in claims.items():
        assert (claim["apiVersion"], claim["kind"]) == ("v1", "PersistentVolumeClaim")
        assert set(claim) == {"apiVersion", "kind", "metadata", "spec"}
        assert len(name) <= 63 and DNS1035_LABEL.fullmatch(name)
        assert _schema_errors(claim["spec"], claim_schema) == []
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name

    job = _job()
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        referenced = {
            v["persistentVolumeClaim"]["claimName"]
            for v in volumes.values()
            if "persistentVolumeClaim" in v
        }
        assert referenced == set(claims)
        (container,) = pod["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert set(mounts) == set(volumes)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RESULTS_DIR"] == mounts["results"]["mountPath"]
        assert volumes["results"]["persistentVolumeClaim"]["claimName"] == "retinaperf-results"
        assert not mounts["results"].get("readOnly")


# The script the pods run ---------------------------------------------------------------------


def _start(tmp_path: Path, job_name: str | None, **env: str) -> tuple[int, str, list[str] | None]:
    """One start of the Master pod's container, as the kubelet starts it: its command, with its
    environment (the job name label for JOB_NAME; RESULTS_DIR in tmp_path), a fake `torchrun`
    that records its arguments. Returns the exit status, stdout, and torchrun's arguments (None:
    not started)."""
    container = _container(_job())
    bin_dir, record = tmp_path / "bin", tmp_path / "torchrun-args"
    bin_dir.mkdir(exist_ok=True)
    record.unlink(missing_ok=True)
    fakes = {
        "torchrun": 'printf "%s\\n" "$@" > "$TORCHRUN_ARGS"\nexit "${TORCHRUN_EXIT:-0}"\n',
        "python3": f'exec "{sys.executable}" "$@"\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCHRUN_ARGS": str(record)}
    for var in container["env"]:
        if "value" in var:
            environment[var["name"]] = var["value"]
        elif job_name is not None:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == f"metadata.labels['{JOB_NAME_LABEL}']"
            environment[var["name"]] = job_name
    environment.update(RESULTS_DIR=str(tmp_path / "results"), **env)
    done = subprocess.run(
        [*container["command"], *container["args"]],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    args = record.read_text().splitlines() if record.exists() else None
    return done.returncode, done.stdout + done.stderr, args


def _retinaperf_args(torchrun_args: list[str]) -> list[str]:
    """The arguments torchrun hands to `retinaperf`, parsed with this torch's torchrun."""
    parsed = get_args_parser().parse_args(torchrun_args)
    assert parsed.module and parsed.training_script == "retinaperf"
    build_parser().parse_args(parsed.training_script_args)  # retinaperf's own parser takes them
    return parsed.training_script_args


def _run_dir(tmp_path: Path, name: str, state: str | None) -> Path:
    """A run directory left by an earlier start: `state` is None (config.json only: killed),
    or results.json's status."""
    out = tmp_path / "results" / name
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}\n")
    if state is not None:
        (out / "results.json").write_text(json.dumps({"status": state}, indent=2) + "\n")
    return out


def test_a_first_start_begins_a_new_run_in_the_jobs_own_directory(tmp_path):
    status, _, args = _start(tmp_path, "retinaperf-2x8-x7b2z")
    assert status == 0 and args is not None
    out = tmp_path / "results" / "retinaperf-2x8-x7b2z"
    assert _retinaperf_args(args) == [
        "run",
        "--preset=A100-2x8",
        "--data-dir=/data/coco2017",
        "--backbone-weights=file:///data/weights/resnet50-0676ba61.pth",
        f"--output-dir={out}",
    ]
    assert (ROOT / "src" / "retinaperf" / "presets" / "A100-2x8.toml").is_file()


@pytest.mark.parametrize("state", [None, "interrupted", "failed"])
def test_a_start_that_finds_the_jobs_run_unfinished_resumes_it(tmp_path, state):
    out = _run_dir(tmp_path, "retinaperf-2x8-x7b2z", state)
    # exec: torchrun's exit status is the container's (143 here: as after a SIGTERM).
    status, _, args = _start(tmp_path, "retinaperf-2x8-x7b2z", TORCHRUN_EXIT="143")
    assert status == 143 and args is not None
    assert _retinaperf_args(args) == ["run", "--resume", str(out)]


def test_a_start_that_finds_the_jobs_run_completed_does_nothing(tmp_path):
    out = _run_dir(tmp_path, "retinaperf-2x8-x7b2z", "completed")
    status, output, args = _start(tmp_path, "retinaperf-2x8-x7b2z")
    assert (status, args) == (0, None)
    assert f"{out} holds a completed run" in output


def test_each_job_has_its_own_run_and_run_name_continues_another(tmp_path):
    """A job created again (another generated name) starts a new run, even beside a completed
    one; RUN_NAME set to an earlier job's name continues that job's run."""
    _run_dir(tmp_path, "retinaperf-2x8-x7b2z", "completed")
    _, _, args = _start(tmp_path, "retinaperf-2x8-q4k9m")
    new_dir = tmp_path / "results" / "retinaperf-2x8-q4k9m"
    assert _retinaperf_args(args)[-1] == f"--output-dir={new_dir}"
    stopped = _run_dir(tmp_path, "retinaperf-2x8-w5n6p", "interrupted")
    _, _, args = _start(tmp_path, "retinaperf-2x8-h2j8r", RUN_NAME="retinaperf-2x8-w5n6p")
    assert _retinaperf_args(args) == ["run", "--resume", str(stopped)]


def test_a_pod_without_the_job_name_label_does_not_start(tmp_path):
    status, output, args = _start(tmp_path, None)
    assert status != 0 and args is None
    assert "JOB_NAME" in output


def test_kubernetes_waits_for_torchrun_to_stop_its_workers(tmp_path):
    """On SIGTERM torchrun SIGKILLs its workers after --shutdown-timeout; Kubernetes kills the
    container after terminationGracePeriodSeconds: the first must end well before the second."""
    _, _, args = _start(tmp_path, "retinaperf-2x8-x7b2z")
    shutdown_timeout = get_args_parser().parse_args(args).shutdown_timeout
    for replica in _job()["spec"]["pytorchReplicaSpecs"].values():
        grace = replica["template"]["spec"]["terminationGracePeriodSeconds"]
        assert 60 <= shutdown_timeout <= grace - 10, (shutdown_timeout, grace)


# The image -----------------------------------------------------------------------------------


def test_the_image_has_the_torch_the_project_is_tested_with():
    text = (EXAMPLE / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    image = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn\d+-runtime", base)
    assert image, base
    requirements = (ROOT / "requirements.txt").read_text()
    (pinned,) = re.findall(r"^torch==(\d+\.\d+\.\d+)\b", requirements, re.MULTILINE)
    assert image.group(1) == pinned
