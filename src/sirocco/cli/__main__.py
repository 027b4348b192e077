"""``python -m sirocco.cli`` (what torchrun starts): the ``sirocco`` command."""

import sys

from . import main

sys.exit(main())
