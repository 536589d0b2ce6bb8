import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Width-16 models gain nothing from threads, and on a shared 2-core machine OpenMP threads
    that spin-wait for each other make training several times slower (modules that train use it
    through `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
