"""python -m compartment: the same as the compartment command."""

from compartment.cli import command

command()
