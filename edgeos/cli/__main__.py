"""`python -m edgeos.cli` runs the CLI."""

from edgeos.cli import main

main()
