"""`python -m vllm_shadow` is the `shadow` command."""

import sys

from vllm_shadow.cli.main import main

sys.exit(main())
