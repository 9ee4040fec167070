"""``python -m serve.cli``: the same as the ``l2grader`` command."""

import sys

from serve.cli.main import main

sys.exit(main())
