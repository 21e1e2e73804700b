"""``python -m layerwise``: the same as the ``layerwise`` command."""
import sys

from .cli import main

if __name__ == "__main__":   # not when re-imported by a spawned worker (layerwise ablate)
    sys.exit(main())
