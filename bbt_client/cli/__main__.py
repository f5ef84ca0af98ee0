"""``python -m bbt_client.cli``: the same as the ``bbt`` command."""

import sys

from bbt_client.cli.commands import main

sys.exit(main())
