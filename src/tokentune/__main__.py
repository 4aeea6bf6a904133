"""``python -m tokentune ...`` runs the command line (also under ``torchrun -m tokentune``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
