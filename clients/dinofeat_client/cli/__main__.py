"""`python -m dinofeat_client.cli`: the same as the `dinofeat` command."""

import sys

from . import main

sys.exit(main())
