"""``python -m benchmarks ABLATION ...``: the same as ``puzzle bench ABLATION ...``."""

import sys

from puzzle_core.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
