"""`python -m coel ...`, the same as the `coel` console script."""
import sys

from coel.cli import main

sys.exit(main())
