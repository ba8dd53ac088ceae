"""``python -m services.cli``: capsctl without its entry point script."""

from services.cli import main

main()
