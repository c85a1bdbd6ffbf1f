"""`python -m moe.convert ...`: the Hugging Face converter's command line (moe/convert/cli.py)."""

import sys

from moe.convert.cli import main

sys.exit(main())
