"""`python -m melanoma_dist` is the `melanoma-dist` command."""

import sys

from melanoma_dist.cli import main

sys.exit(main())
