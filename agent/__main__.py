"""``python -m energy_agent``: the ``energy-agent`` command."""

import sys

from energy_agent.app.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports this module in a child
    sys.exit(main())
