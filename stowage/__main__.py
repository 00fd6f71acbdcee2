"""`python -m stowage` runs the command line."""
from stowage.engine.cli import main

main()
