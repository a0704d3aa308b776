"""``python -m firmware_sim``: see :mod:`firmware_sim.cli`."""

from firmware_sim.cli import main

raise SystemExit(main())
