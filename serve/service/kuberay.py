"""KubeRay patches from a grader config: the RayService's serve config, worker-group bounds and Ray settings.

For one grader config, :func:`render_patch` makes the JSON 6902 patch of the
base RayService (``k8s/base/rayservice.yaml``) that sets

- ``spec.serveConfigV2``: :func:`serve.service.options.serve_config` of the
  config, with the config's path inside the pods (the image holds
  ``configs/`` at ``/app/configs``), i.e. what ``l2grader serve-config`` prints;
- each worker group's ``minReplicas``/``maxReplicas``/``replicas`` from the
  autoscaling bounds of the deployment it hosts, and its Ray resources
  (``rayStartParams`` ``num-cpus``/``num-gpus``) from the deployment's
  ``num_cpus``/``num_gpus``, so a pod holds exactly one replica and Ray's
  autoscaler adds a pod exactly when Serve adds a replica;
- on every Ray container (head and workers), the ``RAY_*`` variables of
  :func:`serve.runtime.ray_cluster.ray_env` and
  :func:`serve.service.proxy_guard.proxy_env`: the Ray settings and the proxy
  guard ``l2grader serve`` gives a local cluster;
- unless ``serving.edge`` is ``ray_proxy``, the edge (:mod:`serve.service.edge`):
  Serve's direct ingress and the edge's secret (from the Secret
  ``l2grader-edge``) on every Ray container, and beside each ingress pod's Ray
  container an ``edge`` container running ``l2grader edge`` on port
  :data:`EDGE_PORT` (named ``api``, what the ``l2grader-api`` Service sends to),
  in front of that pod's ingress replica.

``k8s/generate.py`` writes one such patch per overlay.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import yaml

from serve.runtime.ray_cluster import ray_env
from serve.service.auth import keyed
from serve.service.edge import EDGE_TOKEN_ENV, replica_env
from serve.service.options import serve_config, serve_env
from serve.service.proxy_guard import proxy_env
from serve.service.settings import DeploymentConfig, ServiceConfig

#: Where the image puts the repository's configs/ folder (see k8s/Dockerfile).
IMAGE_CONFIG_DIR = "/app/configs"

#: worker group -> (its index in the base RayService's workerGroupSpecs, the deployment it hosts).
GROUPS: dict[str, tuple[int, str]] = {"ingress": (0, "ingress"), "scorer": (1, "scorer")}

PATCH_FILE = "rayservice-serve-config.yaml"
#: The edge's port in an ingress pod (Serve's proxy keeps ``serving.port`` there, as the edge's backup).
EDGE_PORT = 8100
#: The Secret holding the edge's secret (``L2GRADER_EDGE_TOKEN``), made by the operator (the demo overlay ships one).
EDGE_SECRET = "l2grader-edge"
#: RayService's head Service (KubeRay names it after the RayService): where the edge joins the cluster.
HEAD_GCS = "l2grader-head-svc:6379"


def in_cluster_config_path(config: str) -> str:
    """Where the repository's config file lies inside the pods."""
    return f"{IMAGE_CONFIG_DIR}/{Path(config).name}"


def _whole(value: float, what: str, minimum: int) -> int:
    if value != int(value) or value < minimum:
        raise ValueError(
            f"{what} is {value}: on Kubernetes it must be a whole number >= {minimum} "
            "(a worker pod offers exactly one replica's resources to Ray)"
        )
    return int(value)


def group_settings(d: DeploymentConfig, group: str) -> dict[str, Any]:
    """A worker group's replicas and Ray resources for the deployment it hosts (one replica per pod)."""
    a = d.autoscaling
    params = {"num-cpus": str(_whole(d.num_cpus, f"serving.{group}.num_cpus", 1))}
    if d.num_gpus:
        params["num-gpus"] = str(_whole(d.num_gpus, f"serving.{group}.num_gpus", 1))
    return {
        "minReplicas": a.min_replicas,
        "maxReplicas": a.max_replicas,
        "replicas": max(a.min_replicas, 1),
        "rayStartParams": params,
    }


def patch_ops(cfg: ServiceConfig, config_path: str) -> list[dict[str, Any]]:
    """The JSON 6902 operations that put the config's serve settings into the base RayService."""
    ops: list[dict[str, Any]] = []
    pods = ["/spec/rayClusterConfig/headGroupSpec"]
    for group, (index, deployment) in GROUPS.items():
        base = f"/spec/rayClusterConfig/workerGroupSpecs/{index}"
        # Fails the build if the base's groups were reordered.
        ops.append({"op": "test", "path": f"{base}/groupName", "value": group})
        settings = group_settings(getattr(cfg.serving, deployment), deployment)
        for key in ("minReplicas", "maxReplicas", "replicas"):
            ops.append({"op": "replace", "path": f"{base}/{key}", "value": settings[key]})
        for key, value in settings["rayStartParams"].items():
            ops.append({"op": "add", "path": f"{base}/rayStartParams/{key}", "value": value})
        pods.append(base)
    if not keyed(cfg.serving) and not cfg.serving.allow_unauthenticated:
        raise ValueError(
            "the config names no API key variables (serving.api_keys_env, admin_keys_env): a cluster "
            "would refuse every client beyond its pods; add keys or set serving.allow_unauthenticated"
        )
    for pod in pods:
        for name, value in {**ray_env(), **serve_env(), **proxy_env(config_path)}.items():
            ops.append(
                {
                    "op": "add",
                    "path": f"{pod}/template/spec/containers/0/env/-",
                    "value": {"name": name, "value": value},
                }
            )
    if cfg.serving.edge != "ray_proxy":
        ops += _edge_ops(cfg, config_path, pods)
    text = yaml.safe_dump(serve_config(cfg, config_path), sort_keys=False)
    ops.append({"op": "add", "path": "/spec/serveConfigV2", "value": text})
    return ops


def _edge_env() -> list[dict[str, Any]]:
    """What every Ray container needs behind the edge: Serve's direct ingress, a short drain, the edge's secret."""
    plain = {k: v for k, v in replica_env("unused", peers=("127.0.0.1", "::1")).items() if k != EDGE_TOKEN_ENV}
    return [{"name": k, "value": v} for k, v in plain.items()] + [
        {"name": EDGE_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": EDGE_SECRET, "key": EDGE_TOKEN_ENV}}}
    ]


def edge_container(cfg: ServiceConfig, config_path: str) -> dict[str, Any]:
    """The ``edge`` container beside an ingress pod's Ray container (same image, same pod network)."""
    return {
        "name": "edge",
        "image": "l2grader:latest",
        "imagePullPolicy": "IfNotPresent",
        "command": ["l2grader", "edge", "--config", config_path, "--address", HEAD_GCS, "--node-ip", "$(POD_IP)"],
        "args": ["--port", str(EDGE_PORT), "--proxy-port", str(cfg.serving.port)],
        "ports": [{"name": "api", "containerPort": EDGE_PORT}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            _edge_env()[-1],
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "api"}, "periodSeconds": 5, "failureThreshold": 2},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False},
    }


def _edge_ops(cfg: ServiceConfig, config_path: str, pods: list[str]) -> list[dict[str, Any]]:
    ops = [
        {"op": "add", "path": f"{pod}/template/spec/containers/0/env/-", "value": env}
        for pod in pods
        for env in _edge_env()
    ]
    ingress = f"/spec/rayClusterConfig/workerGroupSpecs/{GROUPS['ingress'][0]}/template/spec/containers/-"
    ops.append({"op": "add", "path": ingress, "value": edge_container(cfg, config_path)})
    return ops


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_patch(cfg: ServiceConfig, config: str) -> str:
    """The text of an overlay's generated patch for the grader config ``config`` (its path in the repository)."""
    body = yaml.dump(patch_ops(cfg, in_cluster_config_path(config)), Dumper=_Dumper, sort_keys=False, width=1000)
    return (
        f"# GENERATED by k8s/generate.py from {config}: do not edit; re-run\n"
        "#   .venv/bin/python k8s/generate.py\n"
        "# after changing the config. Sets the RayService's serveConfigV2, the\n"
        "# worker groups' bounds and Ray resources (one replica per pod) and the\n"
        "# Ray settings of every container.\n" + body
    )


# ---------------------------------------------------------------- a session as a RayJob

#: Labels of a session's pods (not the service's: its PodDisruptionBudgets and probes do not concern them).
SESSION_POD_NAME = "l2grader-session"
#: Pod environment that only the HTTP service reads.
SERVICE_ONLY_ENV = ("L2GRADER_API_KEYS", "L2GRADER_ADMIN_KEYS", *replica_env("unused"))


def session_entrypoint(config: str, manifest: str, out: str, engines: int) -> str:
    """The RayJob's entrypoint: ``l2grader score-session`` on the in-cluster config, joining the job's cluster."""
    return shlex.join(
        [
            "l2grader",
            "score-session",
            "--config",
            in_cluster_config_path(config),
            "--manifest",
            manifest,
            "--out",
            out,
            "--address",
            "auto",
            "--engines",
            str(engines),
        ]
    )


def session_rayjob(
    rayservice: dict[str, Any],
    cfg: ServiceConfig,
    config: str,
    manifest: str,
    out: str,
    engines: int | None = None,
    name: str = "l2grader-session",
) -> dict[str, Any]:
    """A KubeRay ``RayJob`` that scores a session on its own Ray cluster, made from the service's rendered RayService.

    The cluster is the service's (same image, volumes, Ray settings, groups and
    resources, from the same grader config): the ``ingress`` group's CPU pods
    decode, the ``scorer`` group holds ``engines`` engine actors (default: the
    scorer's ``max_replicas``; one GPU each on GPU overlays). Serve's probes, the
    API keys and the edge are left out (no HTTP in a job). ``out`` must be shared by the
    pods: an object-store URI or a path on a ReadWriteMany volume. A failed job
    is retried and goes on where it stopped (``score-session`` is resumable).
    """
    engines = engines or cfg.serving.scorer.autoscaling.max_replicas
    cluster = copy.deepcopy(rayservice["spec"]["rayClusterConfig"])
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    scorer = groups["scorer"]
    scorer["replicas"] = scorer["minReplicas"] = scorer["maxReplicas"] = engines
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in groups.values())]:
        template.get("metadata", {}).get("labels", {})["app.kubernetes.io/name"] = SESSION_POD_NAME
        template.get("metadata", {}).pop("annotations", None)
        template["spec"]["containers"] = [c for c in template["spec"]["containers"] if c["name"] != "edge"]
        for container in template["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                container.pop(probe, None)
            container["env"] = [e for e in container.get("env", []) if e["name"] not in SERVICE_ONLY_ENV]
    meta = rayservice["metadata"]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            **({"namespace": meta["namespace"]} if "namespace" in meta else {}),
            "labels": {**meta.get("labels", {}), "app.kubernetes.io/name": SESSION_POD_NAME},
        },
        "spec": {
            "entrypoint": session_entrypoint(config, manifest, out, engines),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 86400,
            "backoffLimit": 3,
            "rayClusterSpec": cluster,
        },
    }
