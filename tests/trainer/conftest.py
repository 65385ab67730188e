"""One intra-op thread for the trainer tests.

The tiny test models run many small matmuls; on a shared 2-core machine a second OpenMP
thread makes each of them wait for a busy core (measured: a (256x8)@(8x256) matmul took
23 ms with 2 threads, 0.04 ms with 1), which doubled the run time of these tests.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
