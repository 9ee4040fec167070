"""The ``l2grader`` command line: the only part of ``serve`` that may import ``adapters`` and ``loadtest``."""
