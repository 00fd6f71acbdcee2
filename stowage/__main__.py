"""`python -m stowage` runs the command line."""
from stowage.cli import main

main()
