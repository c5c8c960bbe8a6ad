"""MLproject entry point `c6`: maps the -P parameters onto the task spec and trains."""

import sys

from mycelium.entry import main

if __name__ == "__main__":
    sys.exit(main("c6", sys.argv[1:]))
