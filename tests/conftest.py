"""Suite-wide settings: one torch thread per test process.

``make test`` runs two pytest workers on two cores; torch's default of one thread per core in
each worker oversubscribes the machine and makes CPU steps several times slower.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    # Ray tests start local clusters; two at once on one machine join each other's sessions
    # (`make test` runs with --dist loadgroup, so one xdist worker runs them in turn). A
    # cluster takes seconds to start, so they are slow too: out of the fast lane.
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
            item.add_marker(pytest.mark.slow)
