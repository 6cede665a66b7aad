"""Phase 1 data-parallel (DDP, gloo, 2 CPU processes): the same weights as one process with the same global batch."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from mmap_train.config import MMAPConfig
from mmap_train.phase1 import Phase1Recipe, SpotSet, train_phase1

GENES = [f"G{i}" for i in range(12)]
N_SPOTS = 9  # with a global batch of 8: a last batch of 1 spot, so process 1's share of it is empty


def _cfg() -> MMAPConfig:
    # no dropout: its masks are drawn per process, so they could not match one process's
    return MMAPConfig(genes=GENES, backbone="tiny", lora_last_blocks=0, dropout=0.0)


def _recipe(batch_size: int) -> Phase1Recipe:
    return Phase1Recipe(epochs=2, batch_size=batch_size, lr=2e-3, min_lr=1e-4, mag_start_epoch=100, threads=1,
                        seed=3, loader_threads=0, device="cpu")


def _worker(rank: int, world: int, port: int, spots: SpotSet, out: str) -> None:
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        recipe = _recipe(batch_size=4)  # 4 spots per process: a global batch of 8
        train_phase1(_cfg(), spots, None, f"{out}/whole_{rank}", recipe, progress=False)
        # interrupted after epoch 1, resumed: every process reads rank 0's last.pt
        train_phase1(_cfg(), spots, None, f"{out}/resumed", recipe, progress=False, stop_after_epoch=1)
        torch.distributed.barrier()
        train_phase1(_cfg(), spots, None, f"{out}/resumed", recipe, progress=False, resume=True)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spots() -> SpotSet:
    from mmap_train.datasets import Section, read_section_patches

    from mmap_deploy.demo import sample_paths
    from mmap_deploy.inputs.coords import read_coords

    image, coords, mpp = sample_paths()
    xy = read_coords(coords).xy[:N_SPOTS]
    patches = read_section_patches(Section("B4", counts=coords, slide=image, coords=coords, mpp=mpp), xy,
                                   _cfg().view_spec)
    targets = np.random.default_rng(0).normal(1.0, 0.5, (N_SPOTS, len(GENES))).astype(np.float32)
    return SpotSet(patches, targets, np.array(["B4"] * N_SPOTS), [f"s{i}" for i in range(N_SPOTS)])


def test_two_processes_match_one_with_the_same_global_batch(spots, tmp_path):
    from mmap_train.model import load_checkpoint

    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), spots, str(tmp_path)), nprocs=2, join=True)
    one = train_phase1(_cfg(), spots, None, tmp_path / "one", _recipe(batch_size=8), progress=False)

    # rank 0 alone writes checkpoints and logs
    assert sorted(p.name for p in (tmp_path / "whole_0").iterdir()) == ["checkpoint.pt", "last.pt", "log.csv",
                                                                          "log.json"]
    assert list((tmp_path / "whole_1").iterdir()) == []
    ref, _ = load_checkpoint(tmp_path / "one" / "last.pt")
    ddp, ckpt = load_checkpoint(tmp_path / "whole_0" / "last.pt")
    resumed, rckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert ckpt["step"] == rckpt["step"] == 4 and ckpt["data_parallel"] == {"processes": 2, "global_batch": 8}
    sr = ref.state_dict()
    for name, got in ddp.state_dict().items():
        torch.testing.assert_close(got, sr[name], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(resumed.state_dict()[name], sr[name], rtol=1e-4, atol=1e-5, msg=name)
    # the logged loss is the global batch's, as one process logs it
    for a, b in zip(ckpt["history"], one["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # and training did something: the weights differ from a fresh model's
    from mmap_train.model import MMAP

    torch.manual_seed(3)
    fresh = MMAP(_cfg()).state_dict()
    moved = sum(not torch.allclose(fresh[k], v) for k, v in sr.items() if k.startswith("encoder."))
    assert moved > 10
