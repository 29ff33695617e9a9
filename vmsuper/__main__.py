"""`python -m vmsuper`: the same as the `vmsuper` command."""

import sys

from vmsuper.supervisor.entry import main

if __name__ == "__main__":
    sys.exit(main())
