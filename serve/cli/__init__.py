"""The ``l2grader`` command line (``adapters`` and ``loadtest`` add their subcommands through entry points)."""
