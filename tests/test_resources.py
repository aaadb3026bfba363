"""PeakMemory measures the high-water mark of its own body, not of the process's past."""

import gc
import sys

import pytest
import torch

from modelfold.eval.resources import PeakMemory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_peak_rss_of_the_body_alone():
    gc.collect()  # garbage of earlier tests (e.g. a whole LLM) freed inside the body would hide it
    with PeakMemory() as baseline:
        pass
    with PeakMemory() as big:
        block = torch.ones(64 * 2**20)  # 64 Mi floats = 256 MiB, touched
        block += 1
        del block
    with PeakMemory() as after:
        pass
    assert big.exact and after.exact
    assert big.rss_mb > baseline.rss_mb + 200
    # the 256 MiB are freed; the next measurement starts from the current RSS again
    assert after.rss_mb < big.rss_mb - 200
