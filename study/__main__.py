"""`python -m study ...`: see study/cli.py."""

import sys

from study import runtime
from study.cli import main

code = main()
runtime.exit_without_collection()  # ~1.7 s less between the study's last line and the prompt
sys.exit(code)
