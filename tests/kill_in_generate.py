"""Run by tests/test_generate.py in place of ``python -m pipeline``: the CLI, which kills
itself with SIGKILL right after the generate stage has committed its second shard.

Usage: python tests/kill_in_generate.py run CONFIG --no-ray
"""

import os
import signal
import sys

from pipeline.cli import main
from stages.generate import stage

written = 0
real = stage.ShardGenerator.generate_shard


def generate_shard(self, *args, **kwargs):
    global written
    out = real(self, *args, **kwargs)
    written += 1
    if written == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


stage.ShardGenerator.generate_shard = generate_shard
sys.exit(main(sys.argv[1:]))
