"""`python -m worker_transformers.advisor`: the endpoint advisor's command line (cli.py)."""

import sys

from worker_transformers.advisor.cli import main

sys.exit(main())
