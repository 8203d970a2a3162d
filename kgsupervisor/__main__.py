"""`python -m kgsupervisor`: the command line."""
from .cli import main

main()
