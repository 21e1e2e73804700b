"""LAMB on a model sharded with FSDP2, two processes on the CPU (gloo).

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_lamb.py
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_lamb.py --epochs 2 --checkpoint ckpt
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_lamb.py --epochs 3 --checkpoint ckpt --resume

The model and data are the ``digits`` task's (scikit-learn's bundled 8x8
digits, a small convnet). ``fully_shard`` turns every parameter into a
DTensor holding one shard per rank; ``lw.Optimizer`` takes them as they
are. Each rank computes its shard's part of every layer reduction and one
collective per reduction phase combines them, so the trust ratios are
those of whole layers, the same as on one process. Each rank trains on
its half of every global batch; FSDP2 averages the gradients.

``--checkpoint DIR`` saves model and optimizer state with
``torch.distributed.checkpoint`` after the last epoch; ``--resume`` loads
it first and continues from the epoch it was saved at.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import layerwise as lw
from layerwise.tasks import get_task
from layerwise.tasks.digits import DigitsNet

# the lamb preset, with its trust ratio kept in a local and watched
LAMB_WATCHED = """optimizer lamb_watched extends lamb
watch tr
step {
  m = beta1 * m + (1 - beta1) * g
  v = beta2 * v + (1 - beta2) * g^2
  u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * w
  tr = trust(w, u)
  w = w - lr * tr * u
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs in all (default 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--lr", type=float, default=0.05, help="LAMB lr (default 0.05)")
    parser.add_argument("--checkpoint", type=Path, help="save (and with --resume, load) here")
    parser.add_argument("--resume", action="store_true", help="load --checkpoint first")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)                       # the same initial model on every rank
    data = get_task("digits").data()
    model = fully_shard(DigitsNet(), mesh=mesh)
    opt = lw.Optimizer(model.named_parameters(), lw.parse(LAMB_WATCHED, filename="lamb_watched"),
                       lr=args.lr, weight_decay=0.01, record=("every", 1))

    start = 0
    if args.resume:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "epoch": torch.tensor(0)}
        dcp.load(state, checkpoint_id=str(args.checkpoint))
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        start = int(state["epoch"])

    per_rank = args.batch_size // world
    for epoch in range(start, args.epochs):
        order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(epoch))
        for i in range(len(order) // args.batch_size):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            mine = idx[rank * per_rank:(rank + 1) * per_rank]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[mine]), data.y_train[mine]).backward()
            opt.step()
        with torch.no_grad():                  # every rank runs the forward (FSDP2 gathers)
            acc = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1:2d}  val accuracy {acc:.3f}", flush=True)

    if rank == 0:
        print("\nLAMB trust ratio of whole layers (first step here -> last step):")
        for name, values in opt.watched["tr"].items():
            print(f"  {name:14s} {values[0]:.3e} -> {values[-1]:.3e}")
    if args.checkpoint is not None:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd, "epoch": torch.tensor(args.epochs)},
                 checkpoint_id=str(args.checkpoint))
        if rank == 0:
            print(f"checkpoint: {args.checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Work done, checkpoint written, process group destroyed: leave without
    # C++ static destructors. With this torch build a torch.distributed
    # process sometimes aborts at interpreter exit ("terminate called without
    # an active exception", SIGABRT), which torchrun reports as a failure.
    sys.stdout.flush()
    os._exit(0)
