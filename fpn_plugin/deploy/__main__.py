"""``python -m fpn_plugin.deploy``: see fpn_plugin/deploy/cli.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
