import sys

from .app.cli import main

# The guard matters where worker processes are spawned (--workers on macOS/Windows): they import this module
# again as __mp_main__, and must not start another run.
if __name__ == "__main__":
    sys.exit(main())
