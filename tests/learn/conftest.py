import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share: a second thread only waits (badly so on a
    busy machine). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
