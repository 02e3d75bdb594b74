"""`python -m service serve [FLAGS]`: what ./scripts/serve runs."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main())
