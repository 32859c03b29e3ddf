"""Tests for kd/distributed.py and DDP training through kd.engine: two gloo processes on the CPU."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from tiny_detector import FakeDetection, TinyDetector, coco_gt, collate, tiny_loss
from torch.utils.data import DataLoader, DistributedSampler

from kd import distributed as D
from kd.checkpoint import load_checkpoint
from kd.config import TrainConfig
from kd.engine import ShardSampler, build_optimizer, build_scheduler, evaluate, fit, seed_everything
from kd.evaluation import CocoEvaluator
from kd.models.postprocess import PostProcess

CPU = torch.device("cpu")


def test_single_process_fallbacks():
    assert not D.is_dist() and D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean(t) is t and D.all_gather_object({"a": 1}) == [{"a": 1}]
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.device) == (0, 1, CPU) and not D.is_dist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    info = D.init_distributed("cpu")
    assert D.is_dist() and info.world_size == world and D.get_rank() == rank
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, warmup_iters=2, clip_max_norm=0.5, log_every=1000)
    seed_everything(cfg.seed + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = torch.nn.parallel.DistributedDataParallel(TinyDetector())
    data = FakeDetection(8)
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(
        data, batch_size=2, sampler=sampler, collate_fn=collate, drop_last=True, generator=torch.Generator()
    )
    val = FakeDetection(6, augment=False)
    val_loader = DataLoader(
        val, batch_size=2, sampler=ShardSampler(len(val), rank, world), collate_fn=collate
    )

    def evaluate_fn(m):
        return evaluate(m, val_loader, PostProcess(10), CocoEvaluator(coco_gt(val), [1, 2, 3]), device=CPU)

    opt = build_optimizer(model, cfg)
    summary = fit(
        model,
        tiny_loss,
        loader,
        opt,
        build_scheduler(opt, cfg, len(loader)),
        cfg,
        out_dir,
        device=CPU,
        evaluate_fn=evaluate_fn,
    )
    if rank == 1:
        torch.save(
            {"model": model.module.state_dict(), "summary": summary}, os.path.join(out_dir, "rank1.pt")
        )
    D.cleanup()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    # fork (< 1 s) rather than spawn (each child re-imports torch: 5-10 s); spawn where fork is missing
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method
    )
    rank0 = load_checkpoint(tmp_path / "last.pt")
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["epoch"] == 1 and rank0["step"] == 4  # 8 images / (2 ranks x 2) = 2 steps per epoch
    assert rank0["model"].keys() == rank1["model"].keys()
    for k, v in rank0["model"].items():
        assert torch.equal(v, rank1["model"][k]), k
    seed_everything(0)
    assert not torch.equal(TinyDetector().cls.weight, rank0["model"]["cls.weight"])  # it did train
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["val"] == rank1["summary"]["val"] and "AP" in summary["val"]  # all ranks get the metrics
    assert len(rank0["rng"]["ranks"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "last.pt",
        "metrics.json",
        "plots",
        "rank1.pt",
    ]


def _grad_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    D.init_distributed("cpu")
    adapter = torch.nn.Linear(2, 2)
    unused = torch.nn.Linear(2, 2)  # no gradient on this rank: takes part with zeros
    torch.nn.init.ones_(adapter.weight)
    (adapter(torch.full((1, 2), float(rank + 1))).sum()).backward()
    module = torch.nn.ModuleList([adapter, unused])
    D.average_gradients(module)
    torch.save(
        {"grad": adapter.weight.grad, "unused": unused.weight.grad}, os.path.join(out_dir, f"g{rank}.pt")
    )
    D.cleanup()


def test_average_gradients_of_modules_outside_ddp(tmp_path):
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _grad_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method
    )
    g0, g1 = (torch.load(tmp_path / f"g{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(g0["grad"], torch.full((2, 2), 1.5))  # mean of inputs 1 and 2
    torch.testing.assert_close(g0["grad"], g1["grad"])
    torch.testing.assert_close(g0["unused"], torch.zeros(2, 2))
