"""Distributed data parallel on CPU (gloo): 2 ranks match 1 rank, rank 0 alone writes,
runs resume across world sizes, and a rank that cannot join gets a clear error.

The ranks are plain processes with torchrun's environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) running ``python -m capsnet train``.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from capsnet import distributed
from capsnet.train import resume_config, train
from training_helpers import assert_same_weights, make_mnist, tiny_config, tiny_flags, weights

# Float sums are reduced in a different order over 2 ranks; a few Adam steps keep the
# difference at rounding level.
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world_size: int, argv: list[str], timeout: float = 240) -> list[str]:
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "capsnet", "train", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_resume(data_root, tmp_path):
    """Same global batch and seed: 2 gloo ranks reach the 1-rank weights; only rank 0
    writes; the 2-rank run resumes with 2 ranks and with 1 rank."""
    two = tmp_path / "two"
    flags = [*tiny_flags(data_root, two), "--no-augment", "--epochs", "1"]
    outs = _launch(2, flags)
    assert "epoch 1/1" in outs[0] and "2 ranks" in outs[0]
    assert outs[1] == ""  # rank 1 prints nothing
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4]  # written once
    assert rows[0]["world_size"] == 2
    assert not [p.name for p in two.iterdir() if p.name.endswith(".tmp")]

    one = tmp_path / "one"
    train(tiny_config(data_root, one, augment=False, epochs=1))
    assert_same_weights(weights(one), weights(two), atol=ATOL)
    one_eval = json.loads((one / "evaluation.json").read_text())
    two_eval = json.loads((two / "evaluation.json").read_text())
    assert two_eval["num_examples"] == 40  # each test image once, split over the ranks
    assert two_eval["confusion"] == one_eval["confusion"]

    # Resume the 2-rank run with 1 rank, and with 2 ranks; both match 1 rank throughout.
    two_then_one = tmp_path / "two_then_one"
    shutil.copytree(two, two_then_one)
    train(resume_config(two_then_one, epochs=2), resume=True)
    _launch(2, ["--resume", str(two), "--epochs", "2", "--no-progress"])
    train(resume_config(one, epochs=2), resume=True)
    assert json.loads((two / "last.json").read_text())["epoch"] == 2
    assert_same_weights(weights(one), weights(two), atol=ATOL)
    assert_same_weights(weights(one), weights(two_then_one), atol=ATOL)


def test_rank_that_cannot_join_names_the_address(monkeypatch):
    port = _free_port()  # nobody listens there
    for key, value in {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=f"rank 1 of 2 could not join .* 127.0.0.1:{port}"):
        distributed.setup("auto", "cpu", timeout=1)


def test_single_process_context_and_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup("auto", "cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    import torch

    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="dist_backend"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        distributed.setup("mpi", "cpu")
    with pytest.raises(ValueError, match="RANK must be in"):
        monkeypatch.setenv("RANK", "5")
        distributed.setup("gloo", "cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="'nccl' needs CUDA devices"):
        distributed.setup("nccl", "cpu")
