"""DDP (two CPU processes, gloo): the fused model's gradients equal the eager model's, rank by rank."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        import resnet_fused as rf
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch.manual_seed(0)  # same init on both ranks (DDP also broadcasts rank 0's state)
        model = rf.models.ResNet(rf.models.BasicBlock, [1, 1, 1, 1], num_classes=10, small_input=True).train()
        fused, _ = rf.fuse_model(model)
        eager_ddp, fused_ddp = DDP(model), DDP(fused)
        torch.manual_seed(1 + rank)  # different data per rank: the all-reduce must matter
        results = {}
        for tag, net in (("eager", eager_ddp), ("fused", fused_ddp)):
            torch.manual_seed(1 + rank)
            for _ in range(2):
                net.zero_grad()
                x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
                F.cross_entropy(net(x), y).backward()
            results[tag] = {n: p.grad.clone() for n, p in net.module.named_parameters()}
            results[tag + "_buffers"] = {n: b.clone() for n, b in net.module.named_buffers()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo needed")
def test_ddp_gradients_of_fused_equal_eager():
    from tests.oracle import TOLERANCES, assert_matches

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]
    for rank, result in enumerate(results):
        assert list(result["eager"]) == list(result["fused"])
        for name, grad in result["eager"].items():
            assert_matches(result["fused"][name], grad, TOLERANCES["tf32"])
            # all-reduced: both ranks hold the same averaged gradient
            assert torch.allclose(results[0]["fused"][name], results[1]["fused"][name], atol=1e-6, rtol=0)
        for name, buf in result["eager_buffers"].items():
            assert_matches(result["fused_buffers"][name], buf, torch.float32)
