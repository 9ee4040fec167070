"""Serving side of the L2 oral proficiency grader.

- :mod:`serve.grading`: the pure grading core (levels, prompt, audio, scores, config, parts, adapter files);
- :mod:`serve.engine`: what runs with vLLM (requests, offline and online engines, the model plugin);
- :mod:`serve.service`: the HTTP service on Ray Serve (ingress, scorer replicas, registry, metrics);
- :mod:`serve.cli`: the ``l2grader`` command line.
"""
