"""The peer of `shoal bench recovery`: a data-parallel job under torchrun's elastic agent.

Each worker process trains a small MLP with DistributedDataParallel over gloo, rank 0 saves a
checkpoint every --every steps, and every (re)started worker loads the newest one. Each worker
writes one JSON line per event to --events: `start` (its pid and restart count, as soon as it runs), `joined` (process group joined),
`ready` (model built, checkpoint restored: it is about to train) and, on
rank 0, `step`. The benchmark kills one worker with SIGKILL and times the elastic agent's
recovery from those lines.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def log(path, **event):
    event["t"] = time.time()
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--events", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--width", type=int, default=1024)
    a = p.parse_args()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ["RANK"])
    log(a.events, event="start", rank=rank, pid=os.getpid(), restart=restart)
    dist.init_process_group("gloo")
    log(a.events, event="joined", rank=rank, restart=restart)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[m for _ in range(4) for m in (torch.nn.Linear(a.width, a.width), torch.nn.GELU())]
    )
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    start = 0
    if os.path.exists(a.ckpt):
        state = torch.load(a.ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    log(a.events, event="ready", rank=rank, restart=restart, step=start)
    g = torch.Generator().manual_seed(rank)
    for step in range(start + 1, a.steps + 1):
        x = torch.randn(16, a.width, generator=g)
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            if step % a.every == 0:
                tmp = a.ckpt + ".tmp"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
                os.replace(tmp, a.ckpt)
            log(a.events, event="step", rank=rank, restart=restart, step=step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
