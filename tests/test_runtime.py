"""runtime/: counted collectives, Megatron f/g ops, GradSync and Mesh on real gloo ranks.

Few launches, many checks: each launch runs one module-level function on every rank that returns a
dict of plain numbers; the tests below assert on those dicts.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from runtime.collectives import (
    algorithmic_bytes,
    all_gather,
    all_reduce,
    all_reduce_mean_scalar,
    comm_stats,
    copy_to_group,
    recv,
    reduce_from_group,
    reduce_scatter,
    send,
)
from runtime.dp import GradSync
from runtime.mesh import Mesh, init_distributed
from runtime.module import BatchSplit
from search.errors import BadInput

TOL = 1e-5
F32 = 4  # bytes per float32 element


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------- rank functions (run in children)


def _megatron_mlp(rank: int, world: int) -> dict:
    """2-layer MLP, W1 column-parallel, W2 row-parallel over `world` ranks vs one process."""
    g = torch.Generator().manual_seed(0)
    B, din, hid, dout = 4, 6, 8, 5
    x0 = torch.randn(B, din, generator=g)
    w1, b1 = torch.randn(hid, din, generator=g), torch.randn(hid, generator=g)
    w2, b2 = torch.randn(dout, hid, generator=g), torch.randn(dout, generator=g)

    # single-process reference
    ref = [t.clone().requires_grad_() for t in (x0, w1, b1, w2, b2)]
    rx, rw1, rb1, rw2, rb2 = ref
    rloss = ((torch.relu(rx @ rw1.T + rb1) @ rw2.T + rb2) ** 2).mean()
    rloss.backward()

    # tensor parallel: rank keeps hidden units [lo, hi)
    k = hid // world
    lo, hi = rank * k, (rank + 1) * k
    x = x0.clone().requires_grad_()
    pw1 = w1[lo:hi].clone().requires_grad_()
    pb1 = b1[lo:hi].clone().requires_grad_()
    pw2 = w2[:, lo:hi].clone().requires_grad_()
    pb2 = b2.clone().requires_grad_()
    comm_stats.reset()
    h = torch.relu(copy_to_group(x) @ pw1.T + pb1)
    y = reduce_from_group(h @ pw2.T) + pb2
    loss = (y**2).mean()
    loss.backward()
    snap = comm_stats.snapshot()
    return {
        "loss": _maxdiff(loss.detach(), rloss.detach()),
        "x": _maxdiff(x.grad, rx.grad),
        "w1": _maxdiff(pw1.grad, rw1.grad[lo:hi]),
        "b1": _maxdiff(pb1.grad, rb1.grad[lo:hi]),
        "w2": _maxdiff(pw2.grad, rw2.grad[:, lo:hi]),
        "b2": _maxdiff(pb2.grad, rb2.grad),
        "calls": snap["all_reduce"]["calls"],
        "bytes": snap["all_reduce"]["bytes"],
        "expect_bytes": algorithmic_bytes("all_reduce", B * dout * F32, world)
        + algorithmic_bytes("all_reduce", B * din * F32, world),
    }


def _make_dp_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _grad_sync(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(2)
    N = 8
    X, Y = torch.randn(N, 6, generator=g), torch.randn(N, 3, generator=g)
    lossf = torch.nn.MSELoss()

    ref = _make_dp_model()
    lossf(ref(X), Y).backward()
    ref_grads = [p.grad.clone() for p in ref.parameters()]
    nbytes = sum(p.numel() for p in ref.parameters()) * F32

    model = _make_dp_model()
    sync = GradSync(model.parameters(), dist.group.WORLD)
    per = N // world
    xs, ys = X[rank * per:(rank + 1) * per], Y[rank * per:(rank + 1) * per]
    out = {}

    # 1. one backward over this rank's shard == full-batch gradients, via exactly one all-reduce
    comm_stats.reset()
    loss = lossf(model(xs), ys)
    loss.backward()
    snap = comm_stats.snapshot()
    out["plain_diff"] = max(_maxdiff(p.grad, r) for p, r in zip(model.parameters(), ref_grads))
    out["plain_calls"] = snap["all_reduce"]["calls"]
    out["plain_bytes"] = snap["all_reduce"]["bytes"]
    out["expect_bytes"] = algorithmic_bytes("all_reduce", nbytes, world)
    out["global_loss"] = float(all_reduce_mean_scalar(loss))
    with torch.no_grad():
        out["ref_loss"] = float(lossf(ref(X), Y))

    # 2. accumulation: micro a under no_sync, micro b synced -> 2 * full-batch gradients, one all-reduce
    model.zero_grad(set_to_none=True)
    comm_stats.reset()
    half = per // 2
    with sync.no_sync():
        lossf(model(xs[:half]), ys[:half]).backward()
    out["nosync_calls"] = comm_stats.snapshot().get("all_reduce", {}).get("calls", 0)
    lossf(model(xs[half:]), ys[half:]).backward()
    out["accum_diff"] = max(_maxdiff(p.grad, 2 * r) for p, r in zip(model.parameters(), ref_grads))
    out["accum_calls"] = comm_stats.snapshot()["all_reduce"]["calls"]

    # 3. small buckets: W1 192 B | b1 32 B + W2 96 B | b2 12 B -> 3 all-reduces, same result
    sync.remove()
    model.zero_grad(set_to_none=True)
    sync = GradSync(model.parameters(), dist.group.WORLD, bucket_bytes=128)
    comm_stats.reset()
    lossf(model(xs), ys).backward()
    snap = comm_stats.snapshot()
    out["bucket_diff"] = max(_maxdiff(p.grad, r) for p, r in zip(model.parameters(), ref_grads))
    out["bucket_calls"] = snap["all_reduce"]["calls"]
    out["bucket_bytes"] = snap["all_reduce"]["bytes"]
    return out


def _grad_sync_unused(rank: int, world: int) -> dict:
    """A parameter only rank 0 uses: every rank issues the same all-reduces and gets the average."""
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(2 * world, 6, generator=g), torch.randn(2 * world, 3, generator=g)
    lossf = torch.nn.MSELoss()

    def loss_of(model, extra, r):  # rank r's shard; only rank 0 adds `extra`
        out = model(X[2 * r:2 * r + 2])
        return lossf(out + extra if r == 0 else out, Y[2 * r:2 * r + 2])

    ref, ref_extra = _make_dp_model(), torch.nn.Parameter(torch.ones(3))
    (sum(loss_of(ref, ref_extra, r) for r in range(world)) / world).backward()
    model, extra = _make_dp_model(), torch.nn.Parameter(torch.ones(3))
    sync = GradSync([*model.parameters(), extra], dist.group.WORLD, bucket_bytes=128)
    comm_stats.reset()
    loss_of(model, extra, rank).backward()
    sync.remove()
    params, ref_params = [*model.parameters(), extra], [*ref.parameters(), ref_extra]
    return {"calls": comm_stats.snapshot()["all_reduce"]["calls"],
            "missing": [i for i, p in enumerate(params) if p.grad is None],
            "diff": max(_maxdiff(p.grad, r.grad) for p, r in zip(params, ref_params) if p.grad is not None)}


def _collective_values(rank: int, world: int) -> dict:
    """copy_to_group / reduce_from_group / counted wrappers: values and exact byte counts."""
    out = {}
    wg = dist.group.WORLD
    comm_stats.reset()
    # copy_to_group: identity forward, SUM of grads backward
    x = torch.arange(3.0, requires_grad=True)
    y = copy_to_group(x, wg)
    out["copy_fwd"] = _maxdiff(y.detach(), torch.arange(3.0))
    y.backward(torch.full((3,), float(rank + 1)))
    out["copy_bwd"] = _maxdiff(x.grad, torch.full((3,), world * (world + 1) / 2))
    # reduce_from_group: SUM forward, identity backward
    x = torch.full((3,), float(rank + 1), requires_grad=True)
    y = reduce_from_group(x, wg)
    out["reduce_fwd"] = _maxdiff(y.detach(), torch.full((3,), world * (world + 1) / 2))
    gy = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    y.backward(gy)
    out["reduce_bwd"] = _maxdiff(x.grad, gy)
    # plain wrappers
    t = torch.full((5,), float(rank))
    all_reduce(t, wg)
    out["all_reduce"] = _maxdiff(t, torch.full((5,), world * (world - 1) / 2))
    gathered = all_gather(torch.full((2, 3), float(rank)), wg)
    out["all_gather"] = _maxdiff(gathered, torch.arange(world).float().repeat_interleave(2)[:, None].expand(-1, 3))
    rs = reduce_scatter(torch.arange(4.0 * world), wg)
    out["reduce_scatter"] = _maxdiff(rs, world * torch.arange(4.0 * world)[rank * 4:(rank + 1) * 4])
    if rank == 0:
        send(torch.arange(7.0), dst=1)
    elif rank == 1:
        out["p2p"] = _maxdiff(recv(torch.empty(7), src=0), torch.arange(7.0))
    out["mean_scalar"] = float(all_reduce_mean_scalar(torch.tensor(float(rank + 1))))
    out["mean_scalar_float"] = float(all_reduce_mean_scalar(float(rank)))
    ar = algorithmic_bytes
    expect = {
        # copy bwd (3 f32) + reduce fwd (3 f32) + all_reduce (5 f32) + mean_scalar x2 (f32 then f64)
        "all_reduce": {"calls": 5, "bytes": 2 * ar("all_reduce", 12, world) + ar("all_reduce", 20, world)
                       + ar("all_reduce", 4, world) + ar("all_reduce", 8, world)},
        "all_gather": {"calls": 1, "bytes": ar("all_gather", world * 6 * F32, world)},
        "reduce_scatter": {"calls": 1, "bytes": ar("reduce_scatter", 4 * world * F32, world)},
    }
    if rank == 0:
        expect["p2p"] = {"calls": 1, "bytes": 7 * F32}
    out["stats_match"] = comm_stats.snapshot() == expect
    out["stats"] = comm_stats.snapshot()
    out["expect"] = expect
    out["total_match"] = comm_stats.total_bytes() == sum(v["bytes"] for v in expect.values())
    return out


def _launch_two(rank: int, world: int) -> dict:
    out = {"init": init_distributed() == (rank, world)}
    out["coll"] = _collective_values(rank, world)
    out["mlp"] = _megatron_mlp(rank, world)
    out["dp"] = _grad_sync(rank, world)
    out["dp_unused"] = _grad_sync_unused(rank, world)
    try:
        Mesh({"dp": 2, "tp": 2})
        out["bad_mesh"] = "no error"
    except BadInput as e:
        out["bad_mesh"] = str(e)
    m = Mesh({"dp": 2})
    out["mesh1"] = (m.shape, m.size("dp"), m.local_rank("dp"), dist.get_process_group_ranks(m.group("dp")))
    out["dtensor_bytes"] = _live_bytes_of_dtensor_ops()
    return out


def _live_bytes_of_dtensor_ops() -> tuple[int, int, int]:
    """LiveBytes under DTensor ops (how bench/run_emit.py measures FSDP's optimizer step): the mode
    sees the DTensor op, and counts the local shard it creates; (peak, live after, live at the end)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from runtime.memory import LiveBytes

    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    a = distribute_tensor(torch.ones(8, 256), mesh, [Shard(0)])  # 4 x 256 fp32 = 4 KiB per rank
    with LiveBytes(exclude=[a]) as mem:
        b = a * 2
        a.mul_(3)  # in place: nothing new
        live = mem.live
        del b
    return mem.peak, live, mem.live


def _launch_four(rank: int, world: int) -> dict:
    out = {"coll": _collective_values(rank, world), "mlp": _megatron_mlp(rank, world)}
    mesh = Mesh({"dp": 2, "tp": 2})
    out["shape"] = mesh.shape
    out["tp_ranks"] = dist.get_process_group_ranks(mesh.group("tp"))
    out["dp_ranks"] = dist.get_process_group_ranks(mesh.group("dp"))
    out["coords"] = (mesh.local_rank("dp"), mesh.local_rank("tp"))
    out["sizes"] = (mesh.size("dp"), mesh.size("tp"))
    # a Megatron f/g pair on the tp sub-group: counted with p = 2
    comm_stats.reset()
    x = torch.full((4,), float(rank), requires_grad=True)
    y = reduce_from_group(copy_to_group(x, mesh.group("tp")), mesh.group("tp"))
    y.sum().backward()
    out["tp_fwd"] = y.detach().tolist()
    out["tp_bwd"] = x.grad.tolist()
    out["tp_stats"] = comm_stats.snapshot()
    # dp sub-group all-reduce
    t = torch.tensor([float(rank)])
    all_reduce(t, mesh.group("dp"))
    out["dp_sum"] = float(t)
    return out


def _launch_fail(rank: int, world: int) -> dict:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 blocks here until the parent kills it
    return {}


# ---------------------------------------------------------------- tests (parent process)


@pytest.fixture(scope="module")
def two():
    return run_ranks(_launch_two, 2, timeout=90)


@pytest.fixture(scope="module")
def four():
    return run_ranks(_launch_four, 4, timeout=120)


def test_live_bytes_counts_dtensor_local_shards(two):
    for r in two:
        assert r["dtensor_bytes"] == (4 * 256 * F32, 4 * 256 * F32, 0)


def test_algorithmic_bytes_formula():
    assert algorithmic_bytes("all_reduce", 1000, 4) == 1500
    assert algorithmic_bytes("all_gather", 1000, 4) == 750
    assert algorithmic_bytes("reduce_scatter", 1000, 4) == 750
    assert algorithmic_bytes("p2p", 1000, 4) == 1000
    assert algorithmic_bytes("all_reduce", 10, 3) == 13  # 40/3 floored once per call
    assert algorithmic_bytes("all_reduce", 1000, 1) == 0


def test_single_process_noops():
    comm_stats.reset()
    x = torch.ones(3, requires_grad=True)
    assert copy_to_group(x) is x and reduce_from_group(x) is x
    assert all_reduce(x.detach().clone()).tolist() == [1.0, 1.0, 1.0]
    assert comm_stats.snapshot() == {} and comm_stats.total_bytes() == 0


@pytest.mark.parametrize("which", ["two", "four"])
def test_collectives_values_and_bytes(which, request):
    results = request.getfixturevalue(which)
    for rank, r in enumerate(results):
        c = r["coll"]
        for key in ("copy_fwd", "copy_bwd", "reduce_fwd", "reduce_bwd", "all_reduce", "all_gather", "reduce_scatter"):
            assert c[key] <= TOL, (rank, key, c[key])
        if "p2p" in c:
            assert c["p2p"] == 0.0
        world = len(results)
        assert c["mean_scalar"] == pytest.approx((world + 1) / 2)
        assert c["mean_scalar_float"] == pytest.approx((world - 1) / 2)
        assert c["stats_match"], (rank, c["stats"], c["expect"])
        assert c["total_match"]


@pytest.mark.parametrize("which", ["two", "four"])
def test_megatron_mlp_matches_single_process(which, request):
    for rank, r in enumerate(request.getfixturevalue(which)):
        m = r["mlp"]
        for key in ("loss", "x", "w1", "b1", "w2", "b2"):
            assert m[key] <= TOL, (rank, key, m[key])
        assert m["calls"] == 2 and m["bytes"] == m["expect_bytes"], m


def test_grad_sync_dp2(two):
    for rank, r in enumerate(two):
        d = r["dp"]
        assert d["plain_diff"] <= TOL, d
        assert d["plain_calls"] == 1 and d["plain_bytes"] == d["expect_bytes"], d
        assert d["global_loss"] == pytest.approx(d["ref_loss"], abs=1e-5)
        assert d["nosync_calls"] == 0 and d["accum_calls"] == 1, d
        assert d["accum_diff"] <= TOL, d
        assert d["bucket_calls"] == 3 and d["bucket_bytes"] == d["expect_bytes"], d
        assert d["bucket_diff"] <= TOL, d


def test_grad_sync_parameter_unused_on_one_rank(two):
    for rank, r in enumerate(two):
        d = r["dp_unused"]
        assert d["calls"] == 3 and not d["missing"], d  # buckets W1 | b1 W2 | b2 extra on both ranks
        assert d["diff"] <= TOL, d


def test_batch_split_records_and_checks_batched_inputs():
    x, y, w = torch.arange(8.0).reshape(4, 2), torch.arange(4), torch.ones(3)
    split = BatchSplit.from_example((x, w), {"labels": y, "n": 3}, global_batch=4, dp=2, dp_rank=1)
    assert (split.args, split.kwargs) == ((0,), ("labels",))
    args, kwargs = split((x, w), {"labels": y, "n": 3})
    assert args[0].tolist() == [[4.0, 5.0], [6.0, 7.0]] and args[1] is w
    assert kwargs["labels"].tolist() == [2, 3] and kwargs["n"] == 3
    with pytest.raises(BadInput, match="positional input 0 has first dimension 2, but the plan was made for "
                                       "global batch 4"):
        split((x[:2], w), {"labels": y, "n": 3})
    with pytest.raises(BadInput, match="keyword input 'labels' holds the batch in the example but is missing"):
        split((x, w), {"n": 3})
    with pytest.raises(BadInput, match="global batch 3 does not split over dp=2"):
        BatchSplit.from_example((x[:3],), {}, global_batch=3, dp=2, dp_rank=0)
    with pytest.raises(BadInput, match="no example input has the plan's global batch 8"):
        BatchSplit.from_example((x,), {}, global_batch=8, dp=2, dp_rank=0)


def test_init_and_mesh_on_two(two):
    for rank, r in enumerate(two):
        assert r["init"]
        assert "plan needs 4 ranks (dp=2 × tp=2) but torchrun started 2" in r["bad_mesh"]
        assert r["mesh1"] == ((2,), 2, rank, [0, 1])


def test_mesh_dp2_tp2_groups(four):
    for rank, r in enumerate(four):
        assert r["shape"] == (2, 2) and r["sizes"] == (2, 2)
        assert r["tp_ranks"] == [2 * (rank // 2), 2 * (rank // 2) + 1]
        assert r["dp_ranks"] == [rank % 2, rank % 2 + 2]
        assert r["coords"] == (rank // 2, rank % 2)
        tp_sum = float(sum(r["tp_ranks"]))
        assert r["tp_fwd"] == [tp_sum] * 4
        assert r["tp_bwd"] == [2.0] * 4  # identity bwd of g, then SUM over 2 tp ranks in f
        assert r["tp_stats"] == {"all_reduce": {"calls": 2, "bytes": 2 * algorithmic_bytes("all_reduce", 16, 2)}}
        assert r["dp_sum"] == float(sum(r["dp_ranks"]))


def test_harness_surfaces_rank_error_quickly():
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as exc:
        run_ranks(_launch_fail, 2, timeout=60)
    elapsed = time.monotonic() - t0
    msg = str(exc.value)
    assert "rank 1" in msg and "boom from rank 1" in msg and "ValueError" in msg
    assert elapsed < 30, elapsed
