"""`python -m engine.cli` runs the `linkcrm` command."""

from engine.cli import main

main()
