"""``python -m hebbloss.cli`` is the ``hebbloss`` command."""
import sys

from .main import main

sys.exit(main())
