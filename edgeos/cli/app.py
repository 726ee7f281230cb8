"""The typer application every command module registers on."""

import typer

app = typer.Typer(
    help="edgeos: read factory devices, filter at the edge, keep every sample on this gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: paragraphs rewrapped to the terminal, no "<bool>" beside flags.
    rich_markup_mode=None,
)
