"""Suite-wide fixtures."""

from __future__ import annotations

import pytest
import torch

import qkv.threads
from local_index import LocalIndex, make_local_index
from oracle import HF_CONFIGS, make_hf_model, qkv_from_hf

# What torch would use without the `one_thread` fixture: the machine's cores, or OMP_NUM_THREADS.
DEFAULT_THREADS = torch.get_num_threads()
qkv.threads._DONE = True  # `qkv.load` must not change the thread count under the fixtures below


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run tiny models, which are fastest on one thread; two threads on a 2-core machine that
    is also running other work spend their time waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def threads(request, one_thread) -> int:
    """torch's thread count for one test, by indirect parameter: an int, or "default" for
    DEFAULT_THREADS. Bit-exact claims are checked with one thread and again with the default,
    where reductions are split across threads. Returns the count in effect."""
    count = DEFAULT_THREADS if request.param == "default" else request.param
    if request.param == "default" and count == 1:
        pytest.skip("torch uses one thread on this machine: the one-thread case is the default")
    torch.set_num_threads(count)  # `one_thread` puts the caller's count back afterwards
    return count


@pytest.fixture
def seeded():
    """torch's global RNG seeded with 0, for modules whose tests build layers with random init
    (`pytestmark = pytest.mark.usefixtures("seeded")`)."""
    torch.manual_seed(0)


@pytest.fixture(params=sorted(HF_CONFIGS))
def hf_pair(request):
    """(name, HF model, qkv model) with identical weights, for every oracle config (tests/oracle.py)."""
    hf = make_hf_model(request.param)
    return request.param, hf, qkv_from_hf(hf)


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> LocalIndex:
    """pip pointed at a local wheel directory, QKV_HOME fresh, known models replaced (tests/local_index.py)."""
    return make_local_index(tmp_path, monkeypatch)
