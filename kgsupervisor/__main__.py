"""`python -m kgsupervisor`: the command line."""
from kgsupervisor.ops.cli import main

main()
