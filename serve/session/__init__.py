"""Scoring a whole exam session in bulk: a Ray Data pipeline around the offline engine (``l2grader score-session``).

- :mod:`serve.session.sources`: the manifest (CSV, JSON Lines, Parquet) and the audio URIs it names;
- :mod:`serve.session.stages`: the pipeline's stages (decode, check and chunk in CPU tasks; score in engine actors);
- :mod:`serve.session.store`: the output folder (answer parts committed whole, the done set, the candidates table);
- :mod:`serve.session.run`: the driver (Ray, progress, summary).
"""
