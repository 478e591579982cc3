"""``python -m lors_convert`` runs the CLI (also under ``torchrun``)."""

from .cli import main

main()
