"""The attention kernel family: reference vs a float64 naive softmax, Triton (TRITON_INTERPRET=1) vs reference.

Random inputs drawn per test and case (seeded from the test's id, so a failure reproduces), ragged lengths (not
multiples of the 16-wide interpreter blocks), GQA, left/right padding, packing, every pattern, gates with zeros,
decode, statistics, all gradients; outputs are poisoned with NaN first.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxaware.kernels import AttentionPattern, attention
from ctxaware.kernels import triton_attention as tri
from tests.launch import load_benchmark


pytestmark = pytest.mark.usefixtures("stable_seed")  # every random input reproduces (tests/conftest.py)


# tests/conftest.py turns the interpreter on where there is no GPU; on the GPU machine tests/gpu covers Triton.
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)


PATTERNS = {
    "dense": AttentionPattern.dense(),
    "s2": AttentionPattern.s2(8),
    "s2_ragged": AttentionPattern.s2(10),  # G divides neither S nor the block
    "sf": AttentionPattern.sf(12, sinks=3),
    "sf_ratio": AttentionPattern.sf(group_size_ratio=0.25),
    "window": AttentionPattern.sliding_window(9, sinks=2),
}


def naive_allowed(pattern, hq, h, p, j, sk, causal):
    """The mask of the package docstring, written out independently with explicit group boundaries."""
    if causal and j > p:
        return False
    if pattern.kind == "dense":
        return True
    if pattern.kind == "window":
        return abs(p - j) < pattern.window or j < pattern.sinks
    g = pattern.group_size or max(2, 2 * round(pattern.group_size_ratio * sk / 2))
    shifted = h >= hq - int(hq * pattern.shifted_head_fraction)

    def group(x):  # shifted groups: [0, G/2), [G/2, 3G/2), ... (no wrap-around)
        if not shifted:
            return x // g
        return 0 if x < g // 2 else 1 + (x - g // 2) // g

    return group(p) == group(j) or j < pattern.sinks


def naive(q, k, v, pattern, causal=True, pad=None, doc=None, gates=None, labels=None, num_labels=None):
    """float64 loops over (b, h, i): softmax on the allowed keys only."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, sq, d, dtype=torch.float64)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=torch.float64)
    mass = torch.zeros(b, hq, sk, dtype=torch.float64)
    lmass = torch.zeros(b, hq, sq, num_labels or 1, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                p = sk - sq + i
                if pad is not None and not pad[bi, p]:
                    continue
                if gates is not None and gates[bi, i, h] == 0:
                    continue
                keys = [
                    j
                    for j in range(sk)
                    if naive_allowed(pattern, hq, h, p, j, sk, causal)
                    and (pad is None or pad[bi, j])
                    and (doc is None or doc[bi, j] == doc[bi, p])
                ]
                if not keys:
                    continue
                s = (k[bi, kh, keys].double() @ q[bi, h, i].double()) * d**-0.5
                lse[bi, h, i] = torch.logsumexp(s, 0)
                prob = torch.softmax(s, 0)
                out[bi, h, i] = prob @ v[bi, kh, keys].double()
                if gates is not None:
                    out[bi, h, i] *= gates[bi, i, h].double()
                mass[bi, h, keys] += prob
                if labels is not None:
                    for j, pj in zip(keys, prob):
                        lmass[bi, h, i, labels[bi, j]] += pj
    return out, lse, mass, lmass


def make_case(b=2, hq=4, hkv=2, sq=37, sk=37, d=16, pad=None, doc=False, gates=False, labels=False, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    q = torch.randn(b, hq, sq, d, generator=gen)
    k = torch.randn(b, hkv, sk, d, generator=gen)
    v = torch.randn(b, hkv, sk, d, generator=gen)
    kw = {}
    if pad is not None:
        mask = torch.ones(b, sk, dtype=torch.bool)
        n = int(torch.randint(3, sk // 3, (), generator=gen))
        if pad in ("left", "both"):
            mask[0, :n] = False
        if pad in ("right", "both"):
            mask[-1, sk - n :] = False
        kw["key_padding_mask"] = mask
    if doc:
        cuts = torch.randint(1, sk, (b, 2), generator=gen)
        pos = torch.arange(sk)
        kw["doc_ids"] = (pos[None] >= cuts[:, :1]).long() + (pos[None] >= cuts[:, 1:]).long()
    if gates:
        g = torch.rand(b, sq, hq, generator=gen) + 0.1
        g[:, :16, 0] = 0  # a whole query tile of one head switched off: skipped
        g[:, ::3, 1] = 0  # scattered zeros inside live tiles
        if gates == "routed":  # per-token top half of the heads, as an MoH router picks them
            g = g * (torch.rand(b, sq, hq, generator=gen).argsort(-1) < hq // 2)
        kw["head_gates"] = g
    if labels:
        kw["key_labels"] = torch.randint(0, 3, (b, sk), generator=gen)
        kw["num_labels"] = 3
    return q, k, v, kw


def check_close(a, b, tol, name):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: -inf pattern differs"
    err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= tol * (1 + b[finite].abs().max().item() if finite.any() else 1), f"{name}: max err {err}"


CASES = {
    "dense_gqa": dict(),
    "ragged_mha": dict(hq=2, hkv=2, sq=45, sk=45),
    "left_pad": dict(pad="left"),
    "right_pad": dict(pad="right"),
    "packing": dict(doc=True),
    "gates": dict(gates=True),
    "routed_gates_ragged": dict(gates="routed", hq=8, hkv=2, sq=45, sk=45),
    "routed_gates_decode": dict(gates="routed", sq=21, sk=50, pad="left"),
    "labels": dict(labels=True),
    "decode_1": dict(sq=1, sk=41, labels=True),
    "decode_5": dict(sq=5, sk=50, pad="left"),
    "everything": dict(pad="both", doc=True, gates=True, labels=True, hq=4, hkv=1, sk=53, sq=53, d=32),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("case", ["decode_1", "everything"])
def test_reference_matches_naive_float64(pattern, case):
    q, k, v, kw = make_case(**CASES[case])
    q, k, v = q.double(), k.double(), v.double()
    out, stats = attention(
        q, k, v, pattern=PATTERNS[pattern], key_mass=True, return_lse=True, backend="reference", **kw
    )
    ref = naive(
        q,
        k,
        v,
        PATTERNS[pattern],
        pad=kw.get("key_padding_mask"),
        doc=kw.get("doc_ids"),
        gates=kw.get("head_gates"),
        labels=kw.get("key_labels"),
        num_labels=kw.get("num_labels"),
    )
    check_close(out, ref[0], 1e-10, "out")
    check_close(stats.lse, ref[1], 1e-6, "lse")
    check_close(stats.key_mass, ref[2], 1e-6, "key_mass")
    if "key_labels" in kw:
        check_close(stats.label_mass, ref[3], 1e-6, "label_mass")


def test_reference_noncausal_matches_naive():
    q, k, v, kw = make_case(pad="right", doc=True)
    for pattern in PATTERNS.values():
        out, stats = attention(
            q.double(),
            k.double(),
            v.double(),
            causal=False,
            pattern=pattern,
            return_lse=True,
            backend="reference",
            **kw,
        )
        ref = naive(q, k, v, pattern, causal=False, pad=kw["key_padding_mask"], doc=kw["doc_ids"])
        check_close(out, ref[0], 1e-10, "out")
        check_close(stats.lse, ref[1], 1e-6, "lse")


@pytest.fixture
def poisoned(monkeypatch):
    """Every Triton output starts as NaN (integers: their minimum), so an element a kernel forgets to write fails."""

    def empty(shape, like, dtype=None):
        dtype = dtype or like.dtype
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, poison, device=like.device, dtype=dtype)

    monkeypatch.setattr(tri, "_empty", empty)


def run_both(q, k, v, kw, **extra):
    results = {}
    dout = torch.randn(q.shape, dtype=q.dtype)
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        kwb = dict(kw)
        if "head_gates" in kw:
            kwb["head_gates"] = kw["head_gates"].clone().requires_grad_()
            leaves.append(kwb["head_gates"])
        out, stats = attention(*leaves[:3], key_mass=True, return_lse=True, backend=backend, **kwb, **extra)
        grads = torch.autograd.grad(out, leaves, dout)
        results[backend] = (out, stats, grads)
    return results


def check_results_match(res, kw):
    """Triton against the reference in `run_both`'s results: out, lse, key_mass, label_mass (when labelled) and the
    gradients of q, k, v and the gates (when gated)."""
    (o1, s1, g1), (o2, s2, g2) = res["reference"], res["triton"]
    check_close(o2, o1, 1e-5, "out")
    check_close(s2.lse, s1.lse, 1e-5, "lse")
    check_close(s2.key_mass, s1.key_mass, 1e-5, "key_mass")
    if "key_labels" in kw:
        check_close(s2.label_mass, s1.label_mass, 1e-5, "label_mass")
    assert len(g2) == len(g1) == 3 + ("head_gates" in kw)
    for name, a, b in zip(["dq", "dk", "dv", "dgates"], g2, g1):
        check_close(a, b, 1e-4, name)


@pytest.mark.parametrize(
    "case, pattern", [(case, ["sf", "dense", "s2_ragged"][i % 3]) for i, case in enumerate(CASES)]
)
@interpreted
def test_triton_matches_reference(poisoned, case, pattern):
    q, k, v, kw = make_case(**CASES[case])
    res = run_both(q, k, v, kw, pattern=PATTERNS[pattern])
    check_results_match(res, kw)


@pytest.mark.parametrize("pattern", ["s2", "s2_ragged", "sf_ratio", "window"])
@interpreted
def test_triton_patterns(poisoned, pattern):
    q, k, v, kw = make_case(b=1, hq=4, hkv=2, sq=70, sk=70, d=16, pad="left", labels=True)
    res = run_both(q, k, v, kw, pattern=PATTERNS[pattern])
    check_results_match(res, kw)


@pytest.mark.parametrize(
    "pattern, sq, sk, extra",
    [
        (AttentionPattern.sf(24, sinks=20), 100, 100, dict(pad="left")),  # sinks over two key tiles, padded keys
        (AttentionPattern.sf(16, sinks=4), 70, 90, dict(doc=True)),  # queries after a prefix, packed documents
        (AttentionPattern.sliding_window(9, sinks=3), 83, 83, dict(hq=6, hkv=2)),
    ],
)
@interpreted
def test_triton_sink_tiles_summed_over_query_chunks(poisoned, pattern, sq, sk, extra):
    """dK, dV of the key tiles holding sinks come from chunks of queries summed side by side (several chunks here)."""
    q, k, v, kw = make_case(sq=sq, sk=sk, **extra)
    res = run_both(q, k, v, kw, pattern=pattern)
    check_results_match(res, kw)


@pytest.mark.parametrize("causal, pattern", [(False, "window"), (True, "sf_ratio")])
@interpreted
def test_triton_routed_gates_with_an_unrouted_head_and_an_all_routed_row(poisoned, causal, pattern):
    """Gathered rows at their edges: a head no token routes to, a batch row routing every head, keys past queries."""
    q, k, v, kw = make_case(b=2, hq=4, hkv=2, sq=33, sk=40, gates="routed", pad="right")
    kw["head_gates"][:, :, 2] = 0
    kw["head_gates"][0] = torch.rand(33, 4) + 0.1
    res = run_both(q, k, v, kw, causal=causal, pattern=PATTERNS[pattern])
    check_results_match(res, kw)


@pytest.mark.parametrize("gates", [False, "routed"])
@interpreted
def test_triton_heads_launched_in_groups(poisoned, monkeypatch, gates):
    """Heads launched in groups smaller than all (a tiny K/V budget per group), the last group smaller and across
    the batch boundary: 2 x 6 query heads in groups of 8, 2 x 3 kv heads (dk/dv) in groups of 4."""
    q, k, v, kw = make_case(b=2, hq=6, hkv=3, sq=45, sk=45, gates=gates)
    monkeypatch.setattr(tri, "_GROUP_KV_BYTES", 4 * 2 * k[0, 0].numel() * k.element_size())
    assert (tri._head_group(12, 2, k), tri._head_group(6, 1, k)) == (8, 4)
    res = run_both(q, k, v, kw, pattern=PATTERNS["sf"])
    check_results_match(res, kw)


@interpreted
def test_triton_inference_without_autograd(poisoned):
    """No input needs a gradient: the forward runs without an autograd node and gives the reference's results."""
    q, k, v, kw = make_case(hq=4, hkv=2, sq=40, sk=40, gates="routed", labels=True)
    with torch.no_grad():
        res = {b: attention(q, k, v, key_mass=True, return_lse=True, backend=b, **kw) for b in ("reference", "triton")}
    (o1, s1), (o2, s2) = res["reference"], res["triton"]
    assert o2.grad_fn is None
    check_close(o2, o1, 1e-5, "out")
    for name in ("lse", "key_mass", "label_mass"):
        check_close(getattr(s2, name), getattr(s1, name), 1e-5, name)


@interpreted
def test_triton_noncausal(poisoned):
    q, k, v, kw = make_case(b=1, hq=2, hkv=1, sq=33, sk=33, d=32, pad="right")
    res = run_both(q, k, v, kw, causal=False, pattern=PATTERNS["window"])
    check_close(res["triton"][0], res["reference"][0], 1e-5, "out")
    for name, a, b in zip(["dq", "dk", "dv"], res["triton"][2], res["reference"][2]):
        check_close(a, b, 1e-4, name)
    # bf16 / fp16 are covered on the GPU (tests/gpu): the interpreter does not emulate bf16 dots.


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=interpreted)])
def test_masked_rows_are_zero_and_gated_rows_get_no_gradient(poisoned, backend):
    q, k, v, kw = make_case(b=2, hq=2, hkv=2, sq=20, sk=20, pad="left", gates=True)
    gates = kw.pop("head_gates").requires_grad_()
    q.requires_grad_()
    out, stats = attention(q, k, v, head_gates=gates, return_lse=True, backend=backend, **kw)
    dead = ~kw["key_padding_mask"][0]
    assert torch.all(out[0, :, dead] == 0) and torch.all(stats.lse[0, :, dead] == float("-inf"))
    assert torch.all(out[:, 0, :16] == 0) and torch.all(stats.lse[:, 0, :16] == float("-inf"))
    out.sum().backward()
    assert not q.grad.isnan().any() and not gates.grad.isnan().any()
    assert torch.all(gates.grad[gates == 0] == 0)
    assert torch.all(q.grad[:, 0, :16] == 0)


@interpreted
def test_decode_rows_equal_prefill_rows():
    q, k, v, kw = make_case(b=1, hq=4, hkv=2, sq=40, sk=40, labels=True)
    pattern = PATTERNS["sf"]
    full, fs = attention(q, k, v, pattern=pattern, return_lse=True, backend="triton", **kw)
    last, ls = attention(q[:, :, -1:], k, v, pattern=pattern, return_lse=True, backend="triton", **kw)
    check_close(last, full[:, :, -1:], 1e-6, "decode out")
    check_close(ls.label_mass, fs.label_mass[:, :, -1:], 1e-6, "decode label_mass")


def test_auto_backend_on_cpu_and_stats_off_by_default():
    # Without statistics the CPU runs the fused masked-SDPA path (tests/test_kernels_sdpa.py), with them the reference.
    q, k, v, _ = make_case(b=1, hq=2, hkv=2, sq=8, sk=8)
    out, stats = attention(q, k, v)
    assert torch.equal(out, attention(q, k, v, backend="sdpa")[0])
    torch.testing.assert_close(out, attention(q, k, v, backend="reference")[0])
    assert stats.lse is None and stats.key_mass is None and stats.label_mass is None


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AttentionPattern.s2(7), "odd"),
        (lambda: AttentionPattern.s2(0), "positive"),
        (lambda: AttentionPattern("s2"), "exactly one"),
        (lambda: AttentionPattern("ring"), "unknown pattern kind"),
        (lambda: AttentionPattern("window"), "window >= 1"),
        (lambda: AttentionPattern("dense", group_size=4), "only applies"),
        (lambda: AttentionPattern("s2", group_size=4, sinks=4), "use kind='sf'"),
        (lambda: AttentionPattern.sf(group_size_ratio=1.5), r"\(0, 1\]"),
    ],
)
def test_invalid_patterns_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@interpreted
def test_odd_group_is_fine_without_shifted_heads():
    pattern = AttentionPattern.s2(7, shifted_head_fraction=0.0)
    q, k, v, _ = make_case(b=1, hq=2, hkv=1, sq=20, sk=20)
    out, _ = attention(q, k, v, pattern=pattern, backend="triton")
    check_close(out, attention(q, k, v, pattern=pattern, backend="reference")[0], 1e-5, "out")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of key/value heads"),
        (dict(q=torch.randn(1, 4, 9, 16)), "more queries"),
        (dict(q=torch.randn(4, 8, 16)), r"must be \(B, H, S, D\)"),
        (dict(key_padding_mask=torch.ones(1, 8)), "bool tensor"),
        (dict(doc_ids=torch.zeros(1, 7, dtype=torch.long)), "doc_ids"),
        (dict(head_gates=torch.ones(1, 4, 8)), "head_gates"),
        (dict(key_labels=torch.zeros(1, 8, dtype=torch.long)), "go together"),
        (dict(key_labels=torch.full((1, 8), 3), num_labels=3), r"\[0, num_labels=3\)"),
        (dict(backend="cuda"), "backend"),
        (dict(scale=0.0), "scale must be positive"),
        (dict(pattern="sf"), "AttentionPattern"),
        (dict(v=torch.randn(1, 2, 8, 16, dtype=torch.float64)), "share a dtype"),
    ],
)
def test_invalid_inputs_raise(change, match):
    args = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError), match=match):
        attention(q, k, v, **args)


def run_kernel_ab(out: Path, *options: str) -> tuple[dict, str]:
    """`benchmarks/kernel_ab.py --smoke` (the package against itself as the baseline) with `options`: the JSON it
    wrote and what it printed."""
    command = [sys.executable, "benchmarks/kernel_ab.py", "--baseline", "ctxaware/kernels/triton_attention.py"]
    root = Path(__file__).resolve().parents[1]
    printed = subprocess.run([*command, "--out", str(out), "--smoke", *options], check=True, cwd=root,
                             capture_output=True, text=True).stdout  # fmt: skip
    return json.loads((out / "kernel_ab.json").read_text()), printed


def test_kernel_ab_benchmark_smoke(tmp_path):
    """benchmarks/kernel_ab.py end to end on CPU: the package against itself as the baseline, and a copy of it
    (`--variant`) whose K/V budget per launch group splits the heads; every output equals the baseline's."""
    results = run_kernel_ab(tmp_path, "--variant", "_GROUP_KV_BYTES=1024")[0]["results"]
    assert len(results) == 6 and (tmp_path / "kernel_ab.md").exists()
    assert all(row["max_abs_diff"] == 0 and row["fwd"] > 0 and row["fwdbwd"] > 0 for row in results.values())


def test_kernel_ab_benchmark_times_decode_key_mass(tmp_path):
    """`--pattern decode_key_mass`: one decode query a row through both versions, with and without key_mass."""
    results = run_kernel_ab(tmp_path, "--pattern", "decode_key_mass")[0]["results"]
    assert sorted(results) == ["4/2x16 S=24 decode_key_mass baseline", "4/2x16 S=24 decode_key_mass package"]
    for row in results.values():
        assert row["max_abs_diff"] == 0 and row["key_mass_max_abs_diff"] == 0
        assert row["fwd"] > 0 and row["fwd_without_key_mass"] > 0


def test_kernel_ab_benchmark_times_sf(tmp_path):
    """`--pattern sf` times SF-Attn (not the dense and gated cases) through both versions, outputs equal."""
    results = run_kernel_ab(tmp_path, "--pattern", "sf")[0]["results"]
    assert sorted(results) == ["4/2x16 S=24 sf baseline", "4/2x16 S=24 sf package"]
    assert all(row["max_abs_diff"] == 0 and row["fwdbwd"] > 0 for row in results.values())


def test_kernel_ab_repeats_alternate_the_order_and_report_each_runs_change(tmp_path):
    """`--repeats 3`: the versions are timed baseline first, then package first, then baseline first; each time is the
    median of its runs, and the change table holds each run's ratio (the A/B rules judge every run and the median)."""
    body, printed = run_kernel_ab(tmp_path, "--pattern", "sf", "--repeats", "3")
    order = [line.split(" ")[3] for line in printed.splitlines() if " sf " in line]
    assert order == ["baseline", "package", "package", "baseline", "baseline", "package"]
    package = body["results"]["4/2x16 S=24 sf package"]
    assert len(package["fwd_runs"]) == 3 and package["fwd"] == statistics.median(package["fwd_runs"])
    baseline = body["results"]["4/2x16 S=24 sf baseline"]
    change = body["changes"]["4/2x16 S=24 sf package"]["fwdbwd"]
    expected = [p / b - 1 for p, b in zip(package["fwdbwd_runs"], baseline["fwdbwd_runs"])]
    assert change["per_run"] == pytest.approx(expected) and change["median"] == pytest.approx(
        statistics.median(expected)
    )
    assert "| per run | median |" in (tmp_path / "kernel_ab.md").read_text()


def test_attention_breakdown_benchmark_smoke(tmp_path):
    """benchmarks/attention_breakdown.py end to end on CPU: every source edit still applies to the package's kernels,
    every variant compiles and runs, and the table has a row per pattern and variant."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "benchmarks/attention_breakdown.py", "--out", str(tmp_path), "--smoke"]
    subprocess.run(command, check=True, cwd=root)
    rows = json.loads((tmp_path / "attention_breakdown.json").read_text())["rows"]
    variants = ["package", "no_exp", "no_pv", "qk_only", "bwd_no_exp"]
    assert list(rows) == [f"{p} {v}" for p in ("dense", "sf") for v in variants]
    assert all(row.get("fwd_ms", 1) > 0 and row.get("fwdbwd_ms", 1) > 0 for row in rows.values())
    assert all(("fwdbwd_ms" in row) == key.endswith(("package", "bwd_no_exp")) for key, row in rows.items())


@pytest.mark.parametrize(
    "variant, message", [("_NO_SUCH=1", "has no '_NO_SUCH'"), ("_GROUP_KV_BYTES=2**20", "literal")]
)
def test_kernel_ab_rejects_a_bad_variant(tmp_path, variant, message):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "benchmarks/kernel_ab.py", "--baseline", "ctxaware/kernels/triton_attention.py"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path), "--smoke", "--variant", variant], cwd=root, capture_output=True, text=True
    )
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.parametrize("warp_specialize", [False, True])
@interpreted
def test_attention_variants_benchmark_builds_correct_kernels(tmp_path, warp_specialize):
    """benchmarks/attention_variants.py rewrites this package's kernel source; its variants must still be attention."""
    attention_variants = load_benchmark("attention_variants")
    module = attention_variants.load_kernel_source(
        f"av_test_{warp_specialize}", attention_variants.tma_source(warp_specialize), tmp_path
    )
    for pattern in (None, PATTERNS["sf"]):
        q, k, v, _ = make_case(b=1, hq=4, hkv=2, sq=45, sk=45)
        dout = torch.randn_like(q)
        out, lse = module.tma_forward(q, k, v, pattern, 3)
        grads = module.tma_backward(q, k, v, out, lse, dout, pattern)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, pattern=pattern, backend="reference")[0]
        check_close(out, ref, 1e-5, "out")
        for name, a, b in zip(["dq", "dk", "dv"], grads, torch.autograd.grad(ref, leaves, dout)):
            check_close(a, b, 1e-4, name)


class _MassPass:
    """Stands in for the key-mass kernel: records whether a call launched it, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launched = kernel, False

    def __getitem__(self, grid):
        self.launched = True
        return self.kernel[grid]


@interpreted
@pytest.mark.parametrize("pattern", ["dense", "sf", "window"])
@pytest.mark.parametrize("sq, sk, softcap", [(1, 41, None), (3, 50, 2.0), (16, 77, None), (17, 77, 2.0)])
def test_key_mass_of_a_few_queries_comes_from_the_forward_scores(poisoned, monkeypatch, pattern, sq, sk, softcap):
    """Up to KEY_MASS_SCORE_ROWS queries (decode) the forward keeps its scores and key_mass is summed from them, with
    no second pass over the keys; padding, zero gates, soft-capping and grouped heads as the reference has them."""
    mass_pass = _MassPass(tri._key_mass_kernel)
    monkeypatch.setattr(tri, "_key_mass_kernel", mass_pass)
    q, k, v, kw = make_case(hq=4, hkv=2, sq=sq, sk=sk, pad="left", gates=True, seed=sq * 1000 + sk)
    with torch.no_grad():
        got = attention(q, k, v, pattern=PATTERNS[pattern], key_mass=True, softcap=softcap, backend="triton", **kw)[1]
        ref = attention(q, k, v, pattern=PATTERNS[pattern], key_mass=True, softcap=softcap, backend="reference", **kw)[
            1
        ]
    check_close(got.key_mass, ref.key_mass, 1e-5, "key_mass")
    assert mass_pass.launched == (sq > tri.KEY_MASS_SCORE_ROWS)


@interpreted
@pytest.mark.parametrize("sq, sk", [(0, 0), (0, 5)])
def test_empty_sequences_on_every_backend(sq, sk):
    q, k, v = (torch.randn(1, 2, s, 16, requires_grad=True) for s in (sq, sk, sk))
    for backend in ("reference", "sdpa", "triton"):
        out, _ = attention(q, k, v, backend=backend)
        assert out.shape == (1, 2, sq, 16)
        out.sum().backward()
    _, stats = attention(q, k, v, backend="triton", key_mass=True, return_lse=True)
    assert stats.lse.shape == (1, 2, sq) and stats.key_mass.shape == (1, 2, sk)


@interpreted
@pytest.mark.parametrize("pad", [None, "left"])
def test_a_nan_key_reaches_only_the_rows_that_see_it_on_every_backend(pad):
    q, k, v, kw = make_case(b=1, hq=2, hkv=1, sq=12, sk=12, pad=pad)
    k[0, 0, 7] = float("nan")
    rows = {b: attention(q, k, v, backend=b, **kw)[0].isnan().any(-1) for b in ("reference", "sdpa", "triton")}
    assert not rows["reference"][..., :7].any() and rows["reference"][..., 7:].all()
    assert torch.equal(rows["sdpa"], rows["reference"]) and torch.equal(rows["triton"], rows["reference"])


def test_reference_soft_capping_matches_the_formula():
    q, k, v, _ = make_case(b=1, hq=2, hkv=2, sq=9, sk=9, d=16, seed=3)
    cap, scale = 1.5, 16**-0.5
    scores = cap * torch.tanh((q.double() @ k.double().transpose(-1, -2)) * scale / cap)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1) @ v.double()
    out, stats = attention(q.double(), k.double(), v.double(), softcap=cap, return_lse=True, backend="reference")
    check_close(out, expected, 1e-12, "out")
    check_close(stats.lse, scores.logsumexp(-1), 1e-6, "lse")  # statistics are float32
    sdpa, _ = attention(q, k, v, softcap=cap, backend="sdpa")
    check_close(sdpa, expected, 1e-5, "sdpa out")
    with pytest.raises(ValueError, match="softcap must be positive"):
        attention(q, k, v, softcap=0.0)


@interpreted
@pytest.mark.parametrize(
    "case, pattern",
    [("everything", "sf"), ("labels", "dense"), ("decode_5", "s2_ragged"), ("routed_gates_ragged", "sf")],
)
def test_triton_soft_capping_matches_reference(poisoned, case, pattern):
    q, k, v, kw = make_case(**CASES[case])
    res = run_both(q * 3, k, v, kw, pattern=PATTERNS[pattern], softcap=1.0)  # scores well past the cap
    check_results_match(res, kw)
    capped, uncapped = res["triton"][0], attention(q * 3, k, v, pattern=PATTERNS[pattern], **kw)[0]
    assert (capped - uncapped).abs().max() > 1e-2  # the cap changed the result


@interpreted
def test_triton_soft_capped_decode_rows_equal_prefill_rows():
    q, k, v, kw = make_case(b=1, hq=4, hkv=2, sq=40, sk=40, labels=True)
    full, fs = attention(q, k, v, softcap=0.7, return_lse=True, key_mass=True, backend="triton", **kw)
    last, ls = attention(q[:, :, -1:], k, v, softcap=0.7, return_lse=True, backend="triton", **kw)
    check_close(last, full[:, :, -1:], 1e-6, "decode out")
    check_close(ls.label_mass, fs.label_mass[:, :, -1:], 1e-6, "decode label_mass")
