"""`python -m services.feature_discovery`: the `gpu-feature-discovery` command."""

import sys

from services.feature_discovery.cli import main

sys.exit(main())
