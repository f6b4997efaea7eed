"""Muon: momentum SGD whose update for each 2-D matrix is replaced by the nearest (semi-)orthogonal matrix.

Orthogonalizing gives every direction of the update the same size, so rare directions learn as fast as
common ones. The orthogonalization is a few Newton-Schulz iterations (cheap matmuls, fine in bf16)
instead of an SVD. Muon is for the 2-D matrices inside the transformer blocks only; embeddings and the
head go to AdamW.

DistMuon does the same across ranks with no DDP wrapper: gradients are averaged by reduce-scatter so that
each matrix lands (averaged) on the one rank that owns it, that rank alone keeps its momentum and
orthogonalizes it, and an all-gather hands the updated matrix to everyone. Works on NCCL and gloo.
"""
import torch
import torch.distributed as dist


def zeropower_via_newtonschulz5(G, steps=5, dtype=torch.bfloat16):
    """Approximately orthogonalize G (..., rows, cols): U V^T of its SVD, with singular values pushed into
    roughly [0.7, 1.2] rather than exactly 1, which is as good for training and far cheaper.
    The quintic's coefficients maximize the slope at zero, so small singular values grow fast."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X @ X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


_compiled_ns = None


def newton_schulz(G, steps, dtype):
    """Compiled on GPU (fuses the small elementwise ops between matmuls); eager on CPU, where compiling
    would cost more than it saves."""
    global _compiled_ns
    if G.device.type != "cuda":
        return zeropower_via_newtonschulz5(G, steps, dtype)
    if _compiled_ns is None:
        _compiled_ns = torch.compile(zeropower_via_newtonschulz5)
    return _compiled_ns(G, steps, dtype)


def group_by_shape(params):
    """One param group per matrix shape, in order of first appearance: same-shape matrices are
    orthogonalized together in one batched call (and DistMuon scatters them across ranks)."""
    params = list(params)
    shapes = list(dict.fromkeys(p.shape for p in params))
    return [{"params": [p for p in params if p.shape == s]} for s in shapes]


class Muon(torch.optim.Optimizer):
    """Single-process Muon. lr is the step size for a square matrix; tall matrices (rows > cols) get
    lr * sqrt(rows / cols) so that the per-element update is as large as for a square one.
    ns_dtype: the Newton-Schulz dtype (bf16 by default; fp32 for exact comparisons in tests)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=torch.bfloat16):
        params = list(params)
        assert all(p.ndim == 2 for p in params), "Muon is for 2-D matrices only"
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(group_by_shape(params), defaults)
        self.ns_dtype = ns_dtype  # not a group entry: a checkpoint must not override the caller's choice

    def _update(self, group, params, grads):
        """Momentum, orthogonalize and apply, batched over same-shape params (all of them in `group`)."""
        if not params:
            return
        bufs = []
        for p, g in zip(params, grads):
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
            bufs.append(self.state[p]["momentum_buffer"])
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * g
        if group["nesterov"]:
            updates = torch._foreach_lerp(grads, bufs, momentum)  # look ahead along the momentum
        else:
            updates = bufs
        update = newton_schulz(torch.stack(updates), group["ns_steps"], self.ns_dtype)
        rows, cols = params[0].shape
        scale = -group["lr"] * max(1.0, rows / cols) ** 0.5
        torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(update.unbind(0), params)], alpha=scale)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._update(group, params, [p.grad for p in params])


class DistMuon(Muon):
    """Muon across ranks. Within a group of same-shape params, param k is owned by rank k % world_size;
    params are handled in chunks of world_size: one reduce-scatter (average) per chunk delivers each rank
    the gradient of the param it owns, one all-gather per chunk returns the updated params to all.
    Only owners keep momentum buffers, so each rank's optimizer state is a disjoint shard."""

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        for group in self.param_groups:
            params = group["params"]
            chunks = [params[i:i + world] for i in range(0, len(params), world)]
            # 1) launch every reduce-scatter of this group, so communication overlaps
            scattered = []
            for chunk in chunks:
                grads = [p.grad for p in chunk]
                grads += [torch.zeros_like(grads[0])] * (world - len(chunk))  # pad the last chunk
                mine = torch.empty_like(grads[0])
                # stacked along dim 0 (world * rows, cols): gloo splits on dim 0, NCCL on numel; both agree
                work = dist.reduce_scatter_tensor(mine, torch.cat(grads), op=dist.ReduceOp.AVG, async_op=True)
                scattered.append((work, mine))
            for work, _ in scattered:
                work.wait()
            # 2) update the params this rank owns, batched
            owned = [(chunk[rank], mine) for chunk, (_, mine) in zip(chunks, scattered) if rank < len(chunk)]
            self._update(group, [p for p, _ in owned], [g for _, g in owned])
            # 3) share the updated params
            gathers = []
            rows = params[0].size(0)
            for chunk in chunks:
                src = chunk[rank] if rank < len(chunk) else torch.zeros_like(chunk[0])
                out = src.new_empty((world * rows, src.size(1)))
                gathers.append((dist.all_gather_into_tensor(out, src.contiguous(), async_op=True), out, chunk))
            for work, out, chunk in gathers:
                work.wait()
                torch._foreach_copy_(list(chunk), list(out.split(rows)[:len(chunk)]))

    def _owned(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        return {p for g in self.param_groups for k, p in enumerate(g["params"]) if k % world == rank}

    @staticmethod
    def merge_shards(shards, params):
        """Per-rank state dicts (rank order) -> the state dict a single-process Muon would hold."""
        state = {}
        for shard in shards:
            state.update(shard["state"])  # owners are disjoint
        return {"state": state, "param_groups": shards[0]["param_groups"]}

    def load_full_state_dict(self, full):
        """Load a whole (single-process layout) state, then keep only the buffers this rank owns."""
        self.load_state_dict(full)
        owned = self._owned()
        for p in list(self.state):
            if p not in owned:
                del self.state[p]
