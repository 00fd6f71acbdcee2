"""`python -m stowage.cli` runs the command line."""
from stowage.cli import main

main()
