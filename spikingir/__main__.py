"""``python -m spikingir ...``: the same as the ``spikingir`` command."""
import sys

from spikingir.cli import main

sys.exit(main())
