"""``python -m services.cli``: capsctl without its entry point script."""

from . import main

main()
