"""Muon, DistMuon and DistAdamW. The distributed optimizers run on 2 gloo processes and must land on the
same parameters as the single-process optimizers given the averaged gradients."""
import torch

from multiproc import run_gloo
from nanochat.adamw import DistAdamW
from nanochat.muon import DistMuon, Muon, zeropower_via_newtonschulz5

# Shapes chosen to hit the awkward cases: 3 same-shape matrices on 2 ranks (a padded chunk), a tall
# matrix (lr scaled by sqrt(rows/cols)), a lone shape (only rank 0 owns it); for AdamW a dim 0 that does
# not divide by 2 and one smaller than the world size (padded shards).
MUON_SHAPES = [(16, 32), (16, 32), (64, 16), (16, 32), (8, 8)]
ADAM_SHAPES = [(7, 8), (1, 4), (64, 16)]
STEPS = 4
ADAM_KW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
MUON_KW = dict(lr=0.02, momentum=0.95)
# fp32 Newton-Schulz: distributed and single-process results differ only in float rounding
FP32_ATOL = 1e-6
# bf16 Newton-Schulz (the default): each update is only ~3 significant digits, and batching differs by rank
BF16_ATOL = 2e-3


def make_params():
    g = torch.Generator().manual_seed(0)
    muon = [torch.randn(s, generator=g) for s in MUON_SHAPES]
    adam = [torch.randn(s, generator=g) for s in ADAM_SHAPES]
    return [torch.nn.Parameter(p) for p in muon], [torch.nn.Parameter(p) for p in adam]


def rank_grads(step, rank):
    """Each rank's gradients at a step (different per rank, like data-parallel micro-batches)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) for s in MUON_SHAPES + ADAM_SHAPES]


def single_process(world_size, ns_dtype):
    muon_params, adam_params = make_params()
    muon = Muon(muon_params, ns_dtype=ns_dtype, **MUON_KW)
    adam = torch.optim.AdamW(adam_params, **ADAM_KW)
    for step in range(STEPS):
        per_rank = [rank_grads(step, r) for r in range(world_size)]
        for p, *gs in zip(muon_params + adam_params, *per_rank):
            p.grad = sum(gs) / world_size
        muon.step()
        adam.step()
    return [p.detach() for p in muon_params + adam_params]


def distributed_worker(rank, world_size, out_path):
    for ns_dtype in (torch.float32, torch.bfloat16):
        muon_params, adam_params = make_params()
        muon = DistMuon(muon_params, ns_dtype=ns_dtype, **MUON_KW)
        adam = DistAdamW(adam_params, **ADAM_KW)
        for step in range(STEPS):
            for p, g in zip(muon_params + adam_params, rank_grads(step, rank)):
                p.grad = g
            muon.step()
            adam.step()
        # state is sharded: Muon buffers only for owned matrices, Adam moments only for this rank's rows
        owned = {id(p) for group in muon.param_groups for k, p in enumerate(group["params"]) if k % world_size == rank}
        assert {id(p) for p in muon.state} == owned
        for p in adam_params:
            assert adam.state[p]["exp_avg"].shape[0] == -(-p.shape[0] // world_size)
        torch.save([p.detach() for p in muon_params + adam_params], f"{out_path}.{ns_dtype}.{rank}")


def test_newton_schulz_orthogonalizes():
    G = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    for X in (zeropower_via_newtonschulz5(G, dtype=torch.float32), zeropower_via_newtonschulz5(G.T, dtype=torch.float32).T):
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.3, s  # singular values pushed near 1, whatever G's were
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 5  # (G itself was far from it)
    # bf16 iterations track the fp32 result closely
    diff = zeropower_via_newtonschulz5(G).float() - zeropower_via_newtonschulz5(G, dtype=torch.float32)
    assert diff.abs().max() < 0.05


def test_muon_scales_tall_matrices():
    # the same gradient pattern gives a tall matrix a sqrt(rows/cols) larger per-element step
    wide, tall = torch.nn.Parameter(torch.zeros(4, 16)), torch.nn.Parameter(torch.zeros(16, 4))
    g = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    wide.grad, tall.grad = g.clone(), g.T.clone()
    Muon([wide, tall], lr=0.1, ns_dtype=torch.float32).step()
    assert torch.allclose(tall.detach().abs().mean(), 2 * wide.detach().abs().mean(), rtol=1e-5)


def test_distributed_optimizers_match_single_process(tmp_path):
    out = tmp_path / "params"
    run_gloo(distributed_worker, 2, str(out))  # one run of 2 processes covers both NS dtypes
    initial = [p.detach() for ps in make_params() for p in ps]
    for ns_dtype, atol in [(torch.float32, FP32_ATOL), (torch.bfloat16, BF16_ATOL)]:
        rank0, rank1 = torch.load(f"{out}.{ns_dtype}.0"), torch.load(f"{out}.{ns_dtype}.1")
        for a, b in zip(rank0, rank1):
            assert torch.equal(a, b)  # every rank holds the very same parameters
        for got, want, init in zip(rank0, single_process(2, ns_dtype), initial):
            assert (want - init).abs().max() > 0.01  # the optimizers really moved the params
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
