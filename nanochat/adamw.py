"""DistAdamW: AdamW sharded ZeRO-2 style, for the embedding and the head when training on several ranks.

Each parameter is split along dim 0 into world_size equal shards (dim 0 padded with zeros when it does not
divide). A reduce-scatter averages the gradients and leaves each rank only its shard; each rank keeps Adam
moments for its shard alone (1/world_size of the memory) and updates it; an all-gather rebuilds the full
parameter everywhere. This replaces both DDP's all-reduce and a replicated optimizer. Works on NCCL and gloo.
Single-process training uses torch.optim.AdamW (fused on GPU); the math here is the same.
"""
import torch
import torch.distributed as dist


def _shard_rows(p, world):
    return -(-p.size(0) // world)  # ceil: the last shard is padded


def _pad_rows(t, rows):
    """t padded with zero rows along dim 0 up to `rows` rows (t itself when already that long)."""
    if t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.size(0), *t.shape[1:]))])


class DistAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        # 1) launch every reduce-scatter first, so communication overlaps
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                rows = _shard_rows(p, world)
                grad_shard = p.new_empty((rows, *p.shape[1:]))
                full = _pad_rows(p.grad, rows * world)
                work = dist.reduce_scatter_tensor(grad_shard, full, op=dist.ReduceOp.AVG, async_op=True)
                pending.append((group, p, rows, grad_shard, work))
        # 2) update this rank's shard of each param, 3) gather the shards back
        gathers = []
        for group, p, rows, grad_shard, work in pending:
            work.wait()
            p_shard = _pad_rows(p[rank * rows:(rank + 1) * rows], rows).clone()
            self._adamw(group, p, p_shard, grad_shard)
            full = p.new_empty((rows * world, *p.shape[1:]))
            gathers.append((p, full, dist.all_gather_into_tensor(full, p_shard, async_op=True)))
        for p, full, work in gathers:
            work.wait()
            p.copy_(full[:p.size(0)])

    def _adamw(self, group, p, param, grad):
        """One AdamW step on a shard (state is kept per param, shard-shaped), as in torch.optim.AdamW."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        step = state["step"].item()
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        param.mul_(1 - lr * wd)  # decoupled weight decay
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))

    @staticmethod
    def merge_shards(shards, params):
        """Per-rank state dicts (rank order) -> the state dict torch.optim.AdamW would hold
        (moments concatenated along dim 0, padding dropped). `params`: in param-group order."""
        state = {}
        for i, p in enumerate(params):
            if i not in shards[0]["state"]:
                continue
            s = {k: torch.cat([sh["state"][i][k] for sh in shards])[:p.size(0)] for k in ("exp_avg", "exp_avg_sq")}
            state[i] = {"step": shards[0]["state"][i]["step"], **s}
        return {"state": state, "param_groups": shards[0]["param_groups"]}

    def load_full_state_dict(self, full):
        """Load a whole (single-process layout) state, keeping only this rank's padded shard of the moments."""
        rank, world = dist.get_rank(), dist.get_world_size()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for i, s in full["state"].items():
            rows = _shard_rows(params[i], world)
            state[i] = {k: (_pad_rows(v, rows * world)[rank * rows:(rank + 1) * rows].clone() if k != "step" else v)
                        for k, v in s.items()}
        self.load_state_dict({"state": state, "param_groups": full["param_groups"]})
