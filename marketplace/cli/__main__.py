"""`python -m marketplace.cli`, the same as the `shedshare` script."""

from marketplace.cli import main

main(prog_name="shedshare")
