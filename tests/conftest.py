import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests: a modest number of examples keeps each test to a few seconds; no deadline,
# since timings on a shared machine vary. DROPIT_HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("DROPIT_HYPOTHESIS_PROFILE", "default"))

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
