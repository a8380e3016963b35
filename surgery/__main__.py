"""`python -m surgery` (and `torchrun ... -m surgery`): the command line."""
from .cli import main

main(prog_name="surgery")
