"""Run by tests/test_tr_dpo.py in place of ``python -m pipeline``: the CLI, which kills itself
with SIGKILL inside the second TR-DPO refresh, after the reference is mixed and one row is
rescored with it (nothing of that refresh yet in a checkpoint or in metrics.jsonl).

Usage: python tests/kill_in_refresh.py run CONFIG --no-ray
"""

import os
import signal
import sys

from pipeline.cli import main
from pipeline.training import refresh

mixes = 0
real_mix, real_score = refresh.mix_policy_into, refresh.score_row


def mix(*args, **kwargs):
    global mixes
    mixes += 1
    return real_mix(*args, **kwargs)


def score(*args, **kwargs):
    out = real_score(*args, **kwargs)
    if mixes == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


refresh.mix_policy_into, refresh.score_row = mix, score
sys.exit(main(sys.argv[1:]))
