"""``python -m layerwise``: the same as the ``layerwise`` command."""
import sys

from .cli import main

sys.exit(main())
