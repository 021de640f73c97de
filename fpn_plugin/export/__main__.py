"""``python -m fpn_plugin.export``: see fpn_plugin/export/cli.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
