"""The RayJob of a session: made from each overlay's rendered RayService and grader config, valid against
KubeRay's RayJob CRD schema (strict: unknown fields refused), running ``l2grader score-session`` on the
service's image, volumes and Ray settings."""

from __future__ import annotations

import copy
import shlex

import jsonschema
import pytest
import yaml

from serve.cli.main import build_parser, cmd_score_session
from serve.service.kuberay import SERVICE_ONLY_ENV, in_cluster_config_path, session_rayjob
from serve.service.settings import load_service_config
from tests.conftest import l2grader
from tests.test_k8s import K8S, OVERLAYS, SCHEMAS, _strict, gen, render

REPO = K8S.parent
MANIFEST, OUT = "s3://exams/2026-06/manifest.parquet", "s3://exams/2026-06/results"


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.protocols.Validator:
    path = SCHEMAS / "ray.io_rayjobs.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    (version,) = [v for v in yaml.safe_load(path.read_text())["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema)


def _rayservice(overlay: str) -> dict:
    (rs,) = [d for d in render(K8S / "overlays" / overlay) if d["kind"] == "RayService"]
    return rs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_session_rayjob_validates_and_runs_the_service_cluster(overlay, rayjob_validator):
    config = gen.OVERLAYS[overlay]
    cfg = load_service_config(REPO / config)
    rs = _rayservice(overlay)
    job = session_rayjob(rs, cfg, config, MANIFEST, OUT)
    rayjob_validator.validate(job)
    assert job["metadata"]["namespace"] == rs["metadata"]["namespace"]

    # The entrypoint is `l2grader score-session` on the in-cluster config, the given URIs, the job's own cluster.
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    assert args.func is cmd_score_session
    assert (args.config, args.manifest, args.out, args.address) == (
        in_cluster_config_path(config),
        MANIFEST,
        OUT,
        "auto",
    )
    assert args.engines == cfg.serving.scorer.autoscaling.max_replicas

    # The service's cluster: image, volumes, mounts, Ray settings and resources; no Serve probes, no API keys.
    service, session = rs["spec"]["rayClusterConfig"], job["spec"]["rayClusterSpec"]
    assert session["rayVersion"] == service["rayVersion"]
    pairs = [(service["headGroupSpec"], session["headGroupSpec"])]
    pairs += list(zip(service["workerGroupSpecs"], session["workerGroupSpecs"]))
    for theirs, mine in pairs:
        assert mine["rayStartParams"] == theirs["rayStartParams"]
        t, m = theirs["template"]["spec"], mine["template"]["spec"]
        assert m["volumes"] == t["volumes"] and m.get("initContainers") == t.get("initContainers")
        (tc, *beside), (mc,) = t["containers"], m["containers"]  # the service's edge is not the job's
        assert [c["name"] for c in beside] in ([], ["edge"])
        for key in ("image", "volumeMounts", "resources", "ports"):
            assert mc[key] == tc[key], key
        assert mc["env"] == [e for e in tc["env"] if e["name"] not in SERVICE_ONLY_ENV]
        assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(mc)
        assert mine["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "l2grader-session"
    scorer = session["workerGroupSpecs"][1]
    assert scorer["groupName"] == "scorer" and scorer["replicas"] == scorer["maxReplicas"] == args.engines
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] >= 1

    # Unknown or misspelt fields are refused.
    for mutate in (
        lambda j: j["spec"].__setitem__("entrypointt", "x"),
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].__setitem__("maxReplica", 2),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
            "volumeMount", []
        ),
    ):
        bad = copy.deepcopy(job)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            rayjob_validator.validate(bad)


def test_session_job_command_reads_the_rendered_overlay(rayjob_validator):
    rendered = yaml.safe_dump_all(render(K8S / "overlays" / "gpu"))
    r = l2grader(
        "session-job",
        "--config",
        REPO / gen.OVERLAYS["gpu"],
        "--manifest",
        MANIFEST,
        "--out",
        OUT,
        "--engines",
        "2",
        "--name",
        "june-2026",
        input=rendered,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    rayjob_validator.validate(job)
    assert job["metadata"]["name"] == "june-2026"
    assert (
        "--engines 2" in job["spec"]["entrypoint"] and "/app/configs/qwen2-audio-7b.yaml" in job["spec"]["entrypoint"]
    )
    bad = l2grader(
        "session-job",
        "--config",
        REPO / gen.OVERLAYS["gpu"],
        "--manifest",
        MANIFEST,
        "--out",
        OUT,
        input="kind: Service\n",
        timeout=120,
    )
    assert bad.returncode == 2 and "expected one RayService" in bad.stderr
