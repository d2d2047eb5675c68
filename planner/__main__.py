"""`python -m planner` runs the autopar CLI."""
import sys

from planner.cli import main

sys.exit(main())
