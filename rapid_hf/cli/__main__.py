"""`python -m rapid_hf.cli ...`: the `rapid-hf` command without the installed entry point (e.g. under
`accelerate launch -m rapid_hf.cli evaluate ...`)."""

import sys

from rapid_hf.cli import main

sys.exit(main())
