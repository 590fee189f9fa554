"""`python -m stoker.helper`: run stoker-helper in the foreground."""

import sys

from stoker.helper.server import main

sys.exit(main())
