"""PeakMemory measures the high-water mark of its own body, not of the process's past."""

import subprocess
import sys

import pytest

BODY = """
import torch
from modelfold.eval.resources import PeakMemory
with PeakMemory() as baseline:
    pass
with PeakMemory() as big:
    block = torch.ones(64 * 2**20)  # 64 Mi floats = 256 MiB, touched
    block += 1
    del block
with PeakMemory() as after:
    pass
print(big.exact and after.exact, baseline.rss_mb, big.rss_mb, after.rss_mb)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_peak_rss_of_the_body_alone():
    # a fresh process: whether freed memory goes back to the OS depends on the allocator's
    # state, which a long test session (many large models) changes
    out = subprocess.run([sys.executable, "-c", BODY], check=True, capture_output=True,
                         text=True).stdout.split()
    exact, baseline, big, after = out[0] == "True", *map(float, out[1:])
    assert exact
    assert big > baseline + 200
    # the 256 MiB are freed; the next measurement starts from the current RSS again
    assert after < big - 200
