"""The Ray Serve application: Ingress (HTTP) in front of Scorer (vLLM), options from the grader config.

``serve.app:build_app`` is the import path Ray Serve config files and KubeRay's
``serveConfigV2`` name; ``l2grader serve`` runs the same builder.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve.config import load_config
from serve.deploy import INGRESS, SCORER, deployment_options
from serve.ingress import Ingress
from serve.scorer import scorer_deployment


def build_app(args: dict[str, Any]) -> Application:
    """Build the application from ``{"config": <path of the grader YAML>}``."""
    config_path = str(args["config"])
    cfg = load_config(config_path)
    opts = deployment_options(cfg)
    scorer = scorer_deployment(cfg.serving.adapters_per_replica).options(**opts[SCORER]).bind(config_path)
    return Ingress.options(**opts[INGRESS]).bind(scorer, config_path)
