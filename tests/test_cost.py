"""Cluster profiles, cost formulas, memory accounting and the real `cpu` calibration."""
import dataclasses
import json

import pytest

from search.cluster import A100_80G, H100_80G, Cluster, builtin_names, get_cluster, load_cpu_profile
from search.cost import (bytes_sent_per_rank, collective_time, compute_time, group_spans_nodes,
                         memory_time)
from search.errors import BadInput
from search.memory import model_state_bytes, transformer_activation_bytes

# a round-number cluster so expected values are exact by hand
TOY = Cluster(name="toy", nodes=2, devices_per_node=4,
              peak_flops={"fp32": 100.0, "bf16": 400.0, "fp16": 400.0},
              memory_bytes=1000, memory_bandwidth=50.0,
              intra_bandwidth=10.0, intra_latency=1.0, inter_bandwidth=2.0, inter_latency=5.0,
              compute_efficiency=0.5)


# ---------------------------------------------------------------- formulas
def test_compute_and_memory_time():
    assert compute_time(1000, "fp32", TOY) == pytest.approx(1000 / 50)
    assert compute_time(1000, "bf16", TOY) == pytest.approx(1000 / 200)
    assert compute_time(1000, "torch.bfloat16", TOY) == pytest.approx(5.0)
    assert memory_time(500, TOY) == pytest.approx(10.0)
    # A100 bf16 at 60%: 312e12 * 0.6 FLOP/s
    assert compute_time(312e12 * 0.6, "bf16", A100_80G) == pytest.approx(1.0)
    with pytest.raises(BadInput):
        compute_time(1, "int8", TOY)


@pytest.mark.parametrize("kind,spans,expected", [
    # p=4, n=80: intra B=10, α=1; inter B=2, α=5
    ("all_reduce", False, 2 * 3 / 4 * 80 / 10 + 2 * 3 * 1),      # 12 + 6 = 18
    ("all_reduce", True, 2 * 3 / 4 * 80 / 2 + 2 * 3 * 5),        # 60 + 30 = 90
    ("all_gather", False, 3 / 4 * 80 / 10 + 3 * 1),              # 6 + 3 = 9
    ("reduce_scatter", True, 3 / 4 * 80 / 2 + 3 * 5),            # 30 + 15 = 45
    ("all_to_all", False, 3 / 4 * 80 / 10),                       # 6
    ("p2p", False, 80 / 10 + 1),                                  # 9
    ("p2p", True, 80 / 2 + 5),                                    # 45
])
def test_collective_time_exact(kind, spans, expected):
    assert collective_time(kind, 80, 4, TOY, spans_nodes=spans) == pytest.approx(expected)


def test_collective_hand_values():
    assert collective_time("all_reduce", 80, 4, TOY, spans_nodes=False) == pytest.approx(18.0)
    assert collective_time("all_gather", 80, 4, TOY, spans_nodes=False) == pytest.approx(9.0)
    # A100, 1 GB all-reduce over 8 GPUs in a node: 1.75e9/300e9 + 14*5e-6
    assert collective_time("all_reduce", 1e9, 8, A100_80G, spans_nodes=False) == pytest.approx(
        1.75e9 / 300e9 + 14 * 5e-6)


def test_collective_group_of_one_and_errors():
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"):
        assert collective_time(kind, 1e6, 1, TOY, spans_nodes=True) == 0.0
        assert bytes_sent_per_rank(kind, 1e6, 1) == 0.0
    with pytest.raises(BadInput, match="broadcast"):
        collective_time("broadcast", 1, 2, TOY, spans_nodes=False)
    with pytest.raises(BadInput):
        collective_time("all_reduce", 1, 0, TOY, spans_nodes=False)


def test_bytes_sent_per_rank():
    assert bytes_sent_per_rank("all_reduce", 100, 4) == pytest.approx(150)
    assert bytes_sent_per_rank("all_gather", 100, 4) == pytest.approx(75)
    assert bytes_sent_per_rank("reduce_scatter", 100, 4) == pytest.approx(75)
    assert bytes_sent_per_rank("all_to_all", 100, 4) == pytest.approx(75)
    assert bytes_sent_per_rank("p2p", 100, 4) == 100
    # all-reduce == reduce-scatter + all-gather in both bytes and bandwidth term
    ar = collective_time("all_reduce", 64, 8, A100_80G, spans_nodes=True)
    rs = collective_time("reduce_scatter", 64, 8, A100_80G, spans_nodes=True)
    ag = collective_time("all_gather", 64, 8, A100_80G, spans_nodes=True)
    assert ar == pytest.approx(rs + ag)


def test_group_spans_nodes():
    # 16 devices, 8 per node, mesh (dp=2, tp=8): tp group inside a node, dp group across nodes
    assert group_spans_nodes((2, 8), 1, 8) is False
    assert group_spans_nodes((2, 8), 0, 8) is True
    # (dp=4, tp=4) on 8-per-node: tp block 4 fits, dp block 16 spans
    assert group_spans_nodes((4, 4), 1, 8) is False
    assert group_spans_nodes((4, 4), 0, 8) is True
    # everything on one node
    assert group_spans_nodes((2, 2, 2), 0, 8) is False
    # pp=2 outermost over 2 nodes, dp=2 × tp=4 inside a node
    assert group_spans_nodes((2, 2, 4), 0, 8) is True
    assert group_spans_nodes((2, 2, 4), 1, 8) is False
    assert group_spans_nodes((2, 2, 4), -1, 8) is False
    # a size-1 axis is a group of one rank: never spans
    assert group_spans_nodes((1, 16), 0, 8) is False
    assert group_spans_nodes((1, 16), 1, 8) is True
    with pytest.raises(BadInput):
        group_spans_nodes((2, 8), 2, 8)


# ---------------------------------------------------------------- memory
def test_model_state_bytes_per_zero_stage():
    n, dp = 1000, 4
    mp = [model_state_bytes(n, dtype="bf16", zero_stage=z, dp=dp) for z in range(4)]
    assert mp[0] == {"params": 2000, "grads": 2000, "optimizer": 12000}
    assert mp[1] == {"params": 2000, "grads": 2000, "optimizer": 3000}
    assert mp[2] == {"params": 2000, "grads": 500, "optimizer": 3000}
    assert mp[3] == {"params": 500, "grads": 500, "optimizer": 3000}
    assert sum(mp[0].values()) == 16 * n
    assert model_state_bytes(n, dtype="fp32", zero_stage=0, dp=dp) == {
        "params": 4000, "grads": 4000, "optimizer": 8000}
    assert model_state_bytes(n, dtype="fp32", zero_stage=3, dp=dp) == {
        "params": 1000, "grads": 1000, "optimizer": 2000}
    assert model_state_bytes(n, dtype="fp16", zero_stage=3, dp=1) == mp[0]  # dp=1: nothing to shard
    assert model_state_bytes(1001, dtype="bf16", zero_stage=3, dp=4)["params"] == 501  # ceil
    with pytest.raises(BadInput):
        model_state_bytes(n, dtype="bf16", zero_stage=4, dp=dp)
    with pytest.raises(BadInput):
        model_state_bytes(n, dtype="bf16", zero_stage=1, dp=0)
    with pytest.raises(BadInput):
        model_state_bytes(n, dtype="bf16", zero_stage=1, dp=2, optimizer="lamb")


def test_transformer_activation_bytes():
    s, b, h, a = 2048, 1, 12288, 96          # GPT-3 175B layer, as in Korthikanti et al.
    sbh = s * b * h
    base = transformer_activation_bytes(s, b, h, a)
    assert base == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert transformer_activation_bytes(s, b, h, a, t=1, sp=True) == pytest.approx(base)
    tp = transformer_activation_bytes(s, b, h, a, t=8)
    assert tp == pytest.approx(sbh * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    tpsp = transformer_activation_bytes(s, b, h, a, t=8, sp=True)
    assert tpsp == pytest.approx(base / 8)
    assert tpsp < tp < base
    assert transformer_activation_bytes(s, b, h, a, recompute="full") == 2 * sbh
    # hand value: s=4, b=2, h=8, a=2 -> 64 * (34 + 5*2*4/8) = 64 * 39
    assert transformer_activation_bytes(4, 2, 8, 2) == pytest.approx(64 * 39)


# ---------------------------------------------------------------- clusters
def test_builtins_and_with_devices():
    assert builtin_names() == ["a100-80g", "cpu", "h100-80g"]
    a = get_cluster("a100-80g")
    assert (a.nodes, a.devices_per_node, a.devices) == (1, 8, 8)
    assert a.peak("bf16") == 312e12 and a.memory_bytes == 80 * 2 ** 30
    assert get_cluster("h100-80g").peak("bf16") == 989e12
    four = get_cluster("a100-80g", devices=4)
    assert (four.nodes, four.devices_per_node) == (1, 4)
    big = a.with_devices(64)
    assert (big.nodes, big.devices_per_node, big.devices) == (8, 8, 64)
    assert big.intra_bandwidth == a.intra_bandwidth
    assert hash(big) != hash(a) and {a, big}  # frozen, hashable
    with pytest.raises(BadInput, match=r"8 or 16"):
        a.with_devices(12)
    for bad in (0, -8, 2.5, True):
        with pytest.raises(BadInput):
            a.with_devices(bad)


def test_unknown_cluster_lists_builtins(tmp_path):
    with pytest.raises(BadInput) as e:
        get_cluster("v100")
    for n in ("a100-80g", "h100-80g", "cpu"):
        assert n in str(e.value)
    with pytest.raises(BadInput, match="does not exist"):
        get_cluster(str(tmp_path / "nope.json"))


def test_json_round_trip(tmp_path):
    for c in (A100_80G, H100_80G, TOY):
        d = c.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert Cluster.from_dict(json.loads(json.dumps(d))) == c
        p = tmp_path / f"{c.name}.json"
        p.write_text(json.dumps(d))
        assert get_cluster(str(p)) == c
    p = tmp_path / "toy.json"
    assert get_cluster(str(p), devices=4) == TOY.with_devices(4)


def _mutate(**kw):
    d = TOY.to_dict()
    for k, v in kw.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return d


_DROP = object()


@pytest.mark.parametrize("text,field", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ("null", "JSON object"),
    ("[" * 100000 + "]" * 100000, "JSON"),                                 # nesting bomb
    (json.dumps(_mutate(nodes=_DROP)), "nodes"),
    (json.dumps(_mutate(nodes=0)), "nodes"),
    (json.dumps(_mutate(nodes=1.5)), "nodes"),
    (json.dumps(_mutate(nodes="2")), "nodes"),
    (json.dumps(_mutate(nodes=True)), "nodes"),
    (json.dumps(_mutate(devices_per_node=-4)), "devices_per_node"),
    (json.dumps(_mutate(memory_bytes=10 ** 400)), "memory_bytes"),        # too big for a float
    (json.dumps(_mutate(memory_bandwidth=None)), "memory_bandwidth"),
    (json.dumps(_mutate(intra_bandwidth=float("inf"))), "intra_bandwidth"),  # json writes Infinity
    (json.dumps(_mutate(inter_bandwidth=float("nan"))), "inter_bandwidth"),
    (json.dumps(_mutate(inter_latency=-1e-6)), "inter_latency"),
    (json.dumps(_mutate(compute_efficiency=1.5)), "compute_efficiency"),
    (json.dumps(_mutate(kernel_launch_s=-1e-6)), "kernel_launch_s"),
    (json.dumps(_mutate(kernel_launch_s="5us")), "kernel_launch_s"),
    (json.dumps(_mutate(kernel_launch_s=2.0)), "kernel_launch_s"),
    (json.dumps(_mutate(peak_flops=[1, 2])), "peak_flops"),
    (json.dumps(_mutate(peak_flops={"int8": 1e12, "fp32": 1.0})), "peak_flops"),
    (json.dumps(_mutate(peak_flops={"bf16": 1e12})), "peak_flops"),
    (json.dumps(_mutate(peak_flops={"fp32": "fast"})), "peak_flops.fp32"),
    (json.dumps(_mutate(collective_factor={"all_to_all": 2.0})), "collective_factor"),
    (json.dumps(_mutate(collective_factor={"reduce_scatter": -1})), "collective_factor.reduce_scatter"),
    (json.dumps(_mutate(collective_factor=[2.0])), "collective_factor"),
    (json.dumps(_mutate(name="")), "name"),
    (json.dumps(_mutate(name=["x"])), "name"),
    (json.dumps(_mutate(__class__="os.system")), "unknown field"),
])
def test_malformed_cluster_file(tmp_path, text, field):
    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(BadInput, match=field.replace(".", r"\.")):
        get_cluster(str(p))


def test_unreadable_cluster_file(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInput):
        get_cluster(str(p))
    with pytest.raises(BadInput, match="cannot read"):
        get_cluster(str(tmp_path))   # a directory


def test_kernel_launch_field(tmp_path):
    """The GPU profiles and profiles written before the field existed get the 5 us default; a measured
    value round-trips through the JSON file."""
    assert A100_80G.kernel_launch_s == H100_80G.kernel_launch_s == 5e-6
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_mutate(kernel_launch_s=_DROP)))
    assert get_cluster(str(old)).kernel_launch_s == 5e-6
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_mutate(kernel_launch_s=3.7e-5)))
    c = get_cluster(str(new))
    assert c.kernel_launch_s == 3.7e-5 and Cluster.from_dict(c.to_dict()) == c


def test_cpu_missing_cache_says_calibrate(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path / "empty"))
    with pytest.raises(BadInput, match="runtime.calibrate"):
        get_cluster("cpu")


# ---------------------------------------------------------------- real calibration
def test_alpha_beta_fit():
    """The ring model's α and B come back exactly from timings it generated (at the calibration's sizes
    and at any others); timings off the model are fitted in relative error."""
    from runtime.calibrate import FIT_BYTES, fit_alpha_beta

    p, alpha, bw = 4, 2e-4, 5e8

    def ring(n, a=alpha, b=bw):
        return 2 * (p - 1) * a + 2 * (p - 1) / p * n / b

    for sizes in (FIT_BYTES, (2 ** 10, 2 ** 16, 2 ** 20, 2 ** 24)):
        a, b = fit_alpha_beta(p, {n: ring(n) for n in sizes})
        assert a == pytest.approx(alpha, rel=1e-9) and b == pytest.approx(bw, rel=1e-9)
    floored = {n: max(ring(n), 4e-3) for n in (2 ** 16, 2 ** 19, 2 ** 22, 2 ** 24)}  # a 4 ms floor
    a, b = fit_alpha_beta(p, floored)
    worst = max(abs(ring(n, a, b) / t - 1) for n, t in floored.items())
    assert worst < 0.3 and a > 2 * alpha  # the floor raises the latency
    assert fit_alpha_beta(p, {1: 1.0, 2: 1.0})[0] == 1e-7  # flat timings: no negative latency


def test_real_cpu_calibration(tmp_path, monkeypatch):
    from runtime.calibrate import ensure_cpu_profile

    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path))
    path = ensure_cpu_profile(ranks=2)
    assert path == tmp_path / "cpu-2.json" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert ensure_cpu_profile(ranks=2) == path and path.stat().st_mtime_ns == mtime  # cached
    c = get_cluster("cpu")
    assert c == load_cpu_profile(path)
    assert (c.name, c.nodes, c.devices_per_node) == ("cpu", 1, 2)
    assert 0.05 < c.compute_efficiency <= 1.0  # measured: a training-shaped MLP vs the square-matmul peak
    f = c.peak("fp32")
    assert 1e8 < f < 1e13 and c.peak("bf16") == f                       # 0.1 GFLOP/s .. 10 TFLOP/s
    assert 1e8 < c.memory_bandwidth < 1e13
    assert 1e6 < c.intra_bandwidth < 1e12                                # loopback gloo
    assert 0 < c.intra_latency < 0.05
    assert c.memory_bytes > 2 ** 27
    assert 1e-8 < c.kernel_launch_s < 1e-2                              # measured: 10 ns .. 10 ms per launch
    # the measured model predicts a sensible all-reduce of 16 MiB: between 0.1 ms and 10 s
    assert 1e-4 < collective_time("all_reduce", 16 * 2 ** 20, 2, c, spans_nodes=False) < 10
    assert get_cluster("cpu", devices=2).devices == 2
    # gloo reduce-scatters by an all-reduce: measured slower than the ring model (what ZeRO's price uses)
    assert set(dict(c.collective_factor)) == {"reduce_scatter", "all_gather"}
    assert 1.0 < c.factor("reduce_scatter") < 20 and 0.3 < c.factor("all_gather") < 20
    # each rank count has its own profile: another one is not there until measured
    with pytest.raises(BadInput, match="calibrate --ranks 3"):
        get_cluster("cpu", devices=3)


def test_dp_sync_per_zero_stage():
    """Data-parallel traffic per step under each ZeRO stage (m microbatches): ZeRO-1 moves the all-reduce
    volume as one reduce-scatter and one all-gather, ZeRO-2 reduce-scatters every microbatch, ZeRO-3 also
    gathers parameters twice per microbatch; ZeRO pays a read and a write of each packed tensor."""
    from search.candidate import LOSS_BYTES, dp_sync

    cl, n, dp, m = A100_80G.with_devices(8), 10 ** 9, 8, 4
    g = 2 * n  # bf16 gradients

    def ring(kind, nbytes, times):
        return times * collective_time(kind, nbytes, dp, cl, spans_nodes=False), times * bytes_sent_per_rank(kind, nbytes, dp)

    loss_t, loss_b = ring("all_reduce", LOSS_BYTES, m)
    expected = {0: [ring("all_reduce", g, 1)],
                1: [ring("reduce_scatter", g, 1), ring("all_gather", g, 1)],
                2: [ring("reduce_scatter", g, m), ring("all_gather", g, 1)],
                3: [ring("reduce_scatter", g, m), ring("all_gather", g, 2 * m)]}
    packed = {0: 0, 1: 2, 2: m + 1, 3: 3 * m}  # collectives that pack the whole tensor
    for zero, parts in expected.items():
        t, b = dp_sync(n, cl, "bf16", dp, zero, m, False)
        assert b == pytest.approx(sum(x for _, x in parts) + loss_b)
        assert t == pytest.approx(sum(x for x, _ in parts) + loss_t + packed[zero] * 2 * g / cl.memory_bandwidth)
    assert dp_sync(n, cl, "bf16", dp, 1, m, False)[1] == pytest.approx(dp_sync(n, cl, "bf16", dp, 0, m, False)[1])
    # ZeRO moves each FSDP unit in its own collective: same bytes, one latency (p-1)α per unit and call
    calls = {0: 0, 1: 2, 2: m + 1, 3: 3 * m}
    for zero in expected:
        t1, b1 = dp_sync(n, cl, "bf16", dp, zero, m, False)
        t5, b5 = dp_sync(n, cl, "bf16", dp, zero, m, False, units=5)
        assert b5 == pytest.approx(b1) and t5 - t1 == pytest.approx(4 * calls[zero] * (dp - 1) * cl.intra_latency)


def test_collective_factor_scales_the_bandwidth_term():
    slow = dataclasses.replace(A100_80G, collective_factor=(("reduce_scatter", 2.5),))
    n, p = 2 ** 30, 8
    base = collective_time("reduce_scatter", n, p, A100_80G, spans_nodes=False)
    alpha = (p - 1) * A100_80G.intra_latency
    assert collective_time("reduce_scatter", n, p, slow, spans_nodes=False) == pytest.approx(alpha + 2.5 * (base - alpha))
    assert collective_time("all_gather", n, p, slow, spans_nodes=False) == collective_time("all_gather", n, p, A100_80G,
                                                                                             spans_nodes=False)
    assert Cluster.from_dict(slow.to_dict()) == slow
