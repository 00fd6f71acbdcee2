"""`python -m stowage.engine.runtime.forkserver <acceptor pid> <socket fd>`: the server."""
from stowage.engine.runtime.forkserver.forking import main

main()
