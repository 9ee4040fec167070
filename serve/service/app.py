"""The Ray Serve application: Ingress (HTTP) in front of Scorer (engine), options from the grader config.

``serve.service.app:build_app`` is the import path Ray Serve config files and
KubeRay's ``serveConfigV2`` name; ``l2grader serve`` runs the same builder.
The replica classes carry no Serve decorator: this builder makes them
deployments with the options of :mod:`serve.service.options`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from ray import serve
from ray.serve import Application

from serve.service.ingress import Ingress, app
from serve.service.options import INGRESS, SCORER, deployment_options
from serve.service.scorer import scorer_class
from serve.service.settings import load_service_config


@functools.cache
def ingress_class() -> type:
    """The Ingress with the FastAPI routes attached (done once per process)."""
    return serve.ingress(app)(Ingress)


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_app(args: dict[str, Any]) -> Application:
    """Build the application from ``{"config": <path of the grader YAML>}``.

    ``"engine"``, optional, is the import path (``module:callable``) of the
    scorer's engine factory; the default is vLLM's ``AsyncLLM``.
    """
    config_path = str(args["config"])
    cfg = load_service_config(config_path)
    opts = deployment_options(cfg)
    scorer_args = (_import(args["engine"]),) if args.get("engine") else ()
    scorer = serve.deployment(scorer_class(cfg.serving.adapters_per_replica), name=SCORER)
    ingress = serve.deployment(ingress_class(), name=INGRESS)
    return ingress.options(**opts[INGRESS]).bind(
        scorer.options(**opts[SCORER]).bind(config_path, *scorer_args), config_path
    )
