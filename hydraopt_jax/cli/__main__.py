"""`python -m hydraopt_jax.cli`: the `hydraopt` command."""

import sys

from . import main

sys.exit(main())
