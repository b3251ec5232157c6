"""`python -m dinofeat_server` runs `dinofeat serve`."""

import sys

from dinofeat_client.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
