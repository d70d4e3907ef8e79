"""``python -m rpc``: see rpc.cli."""
import sys

from .cli import main

sys.exit(main())
