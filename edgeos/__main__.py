"""`python -m edgeos` runs the CLI."""

from edgeos.cli import main

main()
