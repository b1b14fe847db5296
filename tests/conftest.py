import os

import pytest
import torch

# Keep results independent of the number of threads the machine happens to have.
torch.manual_seed(0)


def pytest_report_header(config):
    import dropit_cuda

    return f"dropit_cuda extension: {dropit_cuda.extension_info()}"


@pytest.fixture
def cpu_threads():
    """Runs a test body under a given intra-op thread count, restoring it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
