import numpy as np
import pytest

from gptlab.stats import bootstrap_mean_interval, difference_interval
from helpers import run_python


def test_constant_sample_has_zero_width_interval():
    assert bootstrap_mean_interval([0.5] * 20) == (0.5, 0.5, 0.5)


def test_mean_interval_brackets_the_mean():
    values = np.random.default_rng(0).integers(0, 2, size=200)
    mean, lo, hi = bootstrap_mean_interval(values)
    assert lo < mean < hi and hi - lo < 0.2


def test_paired_difference_of_a_constant_shift_is_exact_unpaired_is_not():
    a = np.random.default_rng(0).integers(0, 2, size=50).astype(float)
    diff, lo, hi = difference_interval(a, a + 0.1, paired=True)
    assert diff == pytest.approx(0.1, abs=1e-12)
    assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.1, abs=1e-12)
    diff, lo, hi = difference_interval(a, a + 0.1, paired=False)
    assert diff == pytest.approx(0.1, abs=1e-12) and lo < 0.1 < hi


def test_stats_imports_without_torch():
    # The arena and the report load stats where torch may be absent or slow to import.
    code = "import sys, gptlab.stats; assert 'torch' not in sys.modules"
    run_python("-c", code, check=True)
