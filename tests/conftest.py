"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and much faster when other
    processes share the cores (threads that spin-wait for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
