"""``python -m energy_agent``: the ``energy-agent`` command."""

import sys

from energy_agent.app.cli import main

sys.exit(main())
