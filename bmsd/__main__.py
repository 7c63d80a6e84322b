"""Run the bmsd command line: ``python -m bmsd``."""

from bmsd.cli import main

raise SystemExit(main())
