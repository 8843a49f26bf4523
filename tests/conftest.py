import contextlib
import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_with_chat_template(tiny_model_dir, tmp_path, template: str):
    """A copy of the tiny model whose tokenizer carries `template` as its chat template."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = template
    tok.save_pretrained(model)
    return model


@contextlib.contextmanager
def single_thread():
    """One intra-op thread, restored afterwards. Models this small gain nothing from intra-op
    threads, and on a busy 2-core machine every OpenMP barrier can stall for milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """Use as `pytestmark = pytest.mark.usefixtures("one_thread_module")`: the whole module."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised ~1M-parameter Llama with the character tokenizer, saved to disk."""
    from grpo.recipes.tasks import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def addition_files(tmp_path_factory):
    """The built-in addition task as JSONL: train (with completions) and held-out."""
    from grpo.recipes.tasks import addition_problems, write_jsonl

    d = tmp_path_factory.mktemp("data")
    train, heldout = addition_problems()
    return {"train": str(write_jsonl(train, d / "train.jsonl", completion=True)),
            "heldout": str(write_jsonl(heldout, d / "heldout.jsonl"))}


@pytest.fixture(scope="session")
def addition_warm_start(tmp_path_factory):
    """The demo's supervised warm start (seed 0), made once: the learning tests start from it."""
    from grpo.recipes.addition import warm_start

    return warm_start(tmp_path_factory.mktemp("addition-warm"), seed=0)


def chromium() -> str:
    """Headless Chromium for the report's browser tests (python3 dev.py test installs Debian's)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the report tests: apt-get install -y chromium "
                "(python3 dev.py test installs it)")
