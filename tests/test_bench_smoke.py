"""CPU smoke tests of the benchmark code (bench/): bytes accounting, roofline math, report and
plot generation from a small synthetic results dict, CLI parsing, and one tiny CPU dry run."""

import json
import os
import sys

import pytest
import torch

from conftest import REPO

# bench/ is not part of the installed package: reach it in the checkout, appended so that
# `int4ops` still resolves to whatever the other tests import (the installed package in CI).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench import common, e2e, kernels, report  # noqa: E402
from int4ops import quantize_rtn  # noqa: E402


@pytest.mark.parametrize("n,k,gs,sym", [(40, 172, 128, False), (40, 172, 32, True), (24, 100, -1, False), (64, 256, 64, False)])
def test_int4_bytes_match_the_packed_format(n, k, gs, sym):
    w = quantize_rtn(torch.randn(n, k), gs, sym=sym, scale_dtype=torch.float16)
    assert common.int4_weight_bytes(n, k, gs, sym) == w.nbytes


def test_point_bytes_and_flops():
    m, n, k = 16, 4096, 4096
    act = (m * k + m * n) * 2
    assert common.point_bytes("dense", m, n, k) == n * k * 2 + act
    assert common.point_bytes("int4", m, n, k, 128, False) == n * k // 2 + (k // 128) * n * 3 + act
    assert common.point_bytes("int4", m, n, k, 128, True) == n * k // 2 + (k // 128) * n * 2 + act
    assert common.flops(m, n, k) == 2 * m * n * k


def test_roofline_and_derive():
    # memory bound: 1 GB at 1 TB/s = 1 ms; compute bound: 1 PFLOP at 1 PFLOP/s = 1 s
    assert common.roofline_time_s(1e9, 1e9, 1e12, 1e15) == pytest.approx(1e-3)
    assert common.roofline_time_s(1e9, 1e15, 1e12, 1e15) == pytest.approx(1.0)
    p = common.derive({"ms": 0.5, "bytes": 1e9, "flops": 1e12}, 4e12, None, 1.0)
    assert p["gbps"] == pytest.approx(2000)
    assert p["pct_bw"] == pytest.approx(50)
    assert p["tflops"] == pytest.approx(2000)  # 1e12 FLOP in 0.5 ms
    assert p["speedup"] == pytest.approx(2)
    assert "speedup" not in common.derive({"ms": 1.0, "bytes": 1, "flops": 1}, None, None, None)


def test_copies_exceed_twice_l2():
    l2 = 50 << 20
    for nbytes in (1 << 20, 9 << 20, 60 << 20, 500 << 20):
        c = common.copies_for(nbytes, l2)
        assert c * nbytes > 2 * l2 and c >= 1
    assert common.copies_for(1 << 20, 0) == 1  # CPU: no L2 to defeat


def test_quantiles():
    q = common.quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert q["ms"] == 3.0 and q["p10"] == pytest.approx(1.4) and q["p90"] == pytest.approx(4.6) and q["reps"] == 5
    assert common.quantiles([2.0])["ms"] == 2.0


def test_bench_calls_wall_clock_on_cpu():
    calls = []
    t = common.bench_calls([lambda: calls.append(1)] * 3, torch.device("cpu"), min_calls=6, reps=4, warmup=1, budget_s=0.01)
    assert t["method"] == "wall-clock" and t["calls"] == 6 and 2 <= t["reps"] <= 4
    assert len(calls) == 6 * (1 + t["reps"])


def test_bench_interleaved_alternates_and_reports_failures():
    cpu = torch.device("cpu")
    order = []
    units = {name: common.make_replay([lambda name=name: order.append(name)], cpu, min_calls=2) for name in "abc"}

    def broken():
        raise RuntimeError("kernel exploded")

    units["bad"] = (broken, "wall-clock", 1)
    t = common.bench_interleaved(units, cpu, reps=6, budget_s=10.0, rounds=3, warmup=1)
    assert t["bad"] == {"error": "RuntimeError: kernel exploded"}
    for name in "abc":
        assert t[name]["reps"] == 6 and t[name]["calls"] == 2 and t[name]["rounds"] == 3
    timed = order[6:]  # after the warm-up replays (one per unit, 2 calls each)
    rounds = [timed[i:i + 12] for i in range(0, 36, 12)]  # 3 units x 2 replays x 2 calls per round
    firsts = [r[0] for r in rounds]
    assert firsts == ["a", "b", "c"]  # the order rotates, so no candidate always runs first
    assert sorted(set(rounds[0])) == ["a", "b", "c"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_keeps_its_inputs_alive():
    """A graph reads its inputs at fixed addresses: make_replay's replay must hold them even
    when the caller does not (two timed units built in a loop that rebinds its variables
    faulted with an illegal address before, pure PyTorch ops included)."""
    import gc
    import weakref

    dev = torch.device("cuda")
    outs = []
    replays = []
    for i in range(2):
        w = torch.full((256, 256), float(i + 1), device=dev)
        replays.append(common.make_replay([lambda w=w: outs.append(w.sum())], dev, min_calls=1)[0])
        alive = weakref.ref(w)
        del w
    gc.collect()
    torch.cuda.empty_cache()
    assert alive() is not None, "the replay does not hold the tensor its graph reads"
    noise = torch.full((1 << 22,), -7.0, device=dev)  # reuse any memory freed by mistake
    for replay in replays:
        replay()
    torch.cuda.synchronize()
    del noise
    # outs: per unit, the warm-up's result, then the captured one (which each replay rewrites)
    assert [outs[1].item(), outs[3].item()] == [256 * 256 * 1.0, 256 * 256 * 2.0]


def test_table_and_slug():
    md = common.table(["a", "b"], [[1, "x"], [22, "yy"]], markdown=True)
    assert md.splitlines()[0] == "| a | b |" and md.splitlines()[2] == "| 1 | x |"
    txt = common.table(["a", "b"], [[1, "x"]])
    assert txt.splitlines()[1].startswith("-")
    assert common.slug(" H100 80GB HBM3") == "h100-80gb-hbm3"
    info = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-22T03:00:00Z"}
    assert common.default_out("kernels", info) == "bench/results/kernels_h100-80gb-hbm3_2026-11-22.json"


def test_kernels_cli_parsing():
    a = kernels.parse_args(["--dtypes", "bf16", "--shapes", "4096x4096,1000x300", "--ms", "1,16", "--quick"])
    assert a.dtypes == [torch.bfloat16]
    assert a.shapes == [("8B o", 4096, 4096), ("1000x300", 1000, 300)]
    assert a.ms == [1, 16] and a.quick and a.group_size == 128 and not a.sym
    d = kernels.parse_args([])
    assert d.dtypes == [torch.float16, torch.bfloat16] and d.shapes is None and d.backends is None
    assert {(n, k) for _, n, k in kernels.SHAPES} == {(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (28672, 8192)}
    assert kernels.MS == [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]


def test_kernels_variant_runs_under_its_environment(tmp_path, monkeypatch):
    """--variant BACKEND:VAR=VALUE times BACKEND again with VAR set while its calls run (CPU: eager
    calls, so every replay sets it), labelled BACKEND[VAR=VALUE]; the environment is put back."""
    with pytest.raises(SystemExit):
        kernels.parse_args(["--variant", "cublas:X=1"])  # only int4ops backends
    with pytest.raises(SystemExit):
        kernels.parse_args(["--variant", "cuda-X=1"])
    assert kernels.parse_args(["--variant", "cuda:INT4OPS_GEMM_STREAM_K=0"]).variants == [("cuda", "INT4OPS_GEMM_STREAM_K", "0")]
    monkeypatch.delenv("INT4OPS_BENCH_VARIANT", raising=False)
    seen = []
    real = kernels.common.make_replay

    def spy(fns, *a, **kw):
        replay, method, calls = real(fns, *a, **kw)
        return (lambda: (seen.append(os.environ.get("INT4OPS_BENCH_VARIANT")), replay())), method, calls

    monkeypatch.setattr(kernels.common, "make_replay", spy)
    out = tmp_path / "k.json"
    assert kernels.main(["--device", "cpu", "--shapes", "64x256", "--ms", "2", "--dtypes", "fp16", "--budget", "0.01",
                         "--reps", "2", "--backends", "cublas,reference", "--variant",
                         "reference:INT4OPS_BENCH_VARIANT=1", "--no-plot", "--out", str(out)]) == 0
    points = {p["backend"]: p for p in json.loads(out.read_text())["results"]}
    assert points["reference[INT4OPS_BENCH_VARIANT=1]"]["ms"] > 0 and points["reference"]["ms"] > 0
    assert "1" in seen and None in seen  # the variant's replays saw it, the plain backend's did not
    assert "INT4OPS_BENCH_VARIANT" not in os.environ


def test_e2e_cli_parsing():
    a = e2e.parse_args(["--model", "70b"])
    assert a.weights == ["int4"] and a.batches == [1, 16] and a.cache_len % 64 == 0
    assert a.cache_len >= a.prompt_len + a.decode_steps + 4
    b = e2e.parse_args(["--model", "8b", "--batches", "1", "--decode-steps", "10"])
    assert b.weights == ["fp16", "int4"] and b.batches == [1]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--weights", "int8"])
    pytest.importorskip("transformers")
    c = e2e.llama_config("70b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads) == (8192, 28672, 80, 8)


def _synthetic_kernels_doc():
    res = []
    for dt in ("fp16", "bf16"):
        for m in (1, 16):
            for b, ms in (("cublas", 0.04), ("triton", 0.015), ("cuda", 0.02)):
                kind = "dense" if b == "cublas" else "int4"
                res.append({"shape": "8B o", "n": 4096, "k": 4096, "m": m, "dtype": dt, "group_size": 128, "sym": False,
                            "backend": b, "bytes": common.point_bytes(kind, m, 4096, 4096), "flops": common.flops(m, 4096, 4096),
                            "ms": ms * (1 + m / 64), "p10": ms, "p90": ms, "note": "", "rel_err": None if b == "cublas" else 1e-3})
    res.append({"shape": "8B o", "n": 4096, "k": 4096, "m": 16, "dtype": "bf16", "group_size": 128, "sym": False,
                "backend": "torch-int4pack", "bytes": 1, "flops": 1, "ms": None, "error": "RuntimeError: boom", "note": ""})
    doc = {"kind": "kernels", "env": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
                                      "int4ops": "0.1.0", "date": "2026-11-22T03:00:00Z"},
           "method": "CUDA events around replays of a captured CUDA graph", "args": {"group_size": 128, "sym": False},
           "bandwidth": {"gbps": 3000.0}, "matmul_peak": {"fp16": {"tflops": 700.0}, "bf16": {"tflops": 750.0}},
           "skipped": [{"backend": "gemlite", "reason": "not importable (ModuleNotFoundError)"}], "results": res,
           "left_out": ["70B gate_up 28672x8192 bf16 (time limit 170s)"]}
    kernels.add_derived(res, doc["bandwidth"], doc["matmul_peak"])
    return doc


def test_add_derived_speedup_and_bound():
    doc = _synthetic_kernels_doc()
    tri = next(p for p in doc["results"] if p["backend"] == "triton" and p["m"] == 1 and p["dtype"] == "fp16")
    cub = next(p for p in doc["results"] if p["backend"] == "cublas" and p["m"] == 1 and p["dtype"] == "fp16")
    assert tri["speedup"] == pytest.approx(cub["ms"] / tri["ms"])
    assert tri["pct_bw"] == pytest.approx(100 * tri["bytes"] / (tri["ms"] * 1e-3) / 3e12)
    bound_ms = tri["bytes"] / 3e12 * 1e3  # memory-bound at M = 1
    assert tri["roofline_ms"] == pytest.approx(bound_ms)
    assert tri["bound_speedup"] == pytest.approx(cub["ms"] / bound_ms)


def test_kernels_markdown_and_plot(tmp_path):
    doc = _synthetic_kernels_doc()
    md = report.kernels_markdown(doc)
    assert "NVIDIA H100 80GB HBM3" in md and "#### fp16" in md and "#### bf16" in md
    assert "| 8B o (4096x4096) | 1 |" in md
    assert "x, " in md and "Skipped: gemlite" in md and "Errors (1 points)" in md and "Left out" in md
    path = tmp_path / "k.json"
    path.write_text(json.dumps(doc))
    assert report.main([str(path), "--no-plot", "--out", str(tmp_path / "k.md")]) == 0
    assert (tmp_path / "k.md").read_text().startswith("### W4A16 kernels")
    pytest.importorskip("matplotlib")
    png = report.plot_kernels(doc, tmp_path / "k.png")
    assert png and png.stat().st_size > 1000


def test_e2e_markdown():
    doc = {"kind": "e2e", "env": {"gpu": "NVIDIA H100 80GB HBM3"}, "method": "m", "args": {},
           "runs": [{"model": "Llama-3-8B-shaped", "weights": "fp16", "weight_gib": 14.96, "peak_gib": 15.5,
                     "decode_bs1_tok_s": 150.0, "decode_bs16_tok_s": 2000.0, "prefill_tok_s": 9000.0,
                     "decode_method": "cuda-graph", "notes": ["a note"]}]}
    md = report.markdown(doc)
    assert "| Llama-3-8B-shaped | fp16 | 14.96 | 15.50 | 150.0 | 2000.0 | 9000 | cuda-graph |" in md and "a note" in md
    with pytest.raises(ValueError):
        report.markdown({"kind": "nope"})


def test_kernels_cpu_dry_run(tmp_path):
    """The whole kernels pipeline on CPU with one tiny shape (reference backend, wall clock)."""
    out = tmp_path / "k.json"
    rc = kernels.main(["--device", "cpu", "--shapes", "64x256", "--ms", "1,3", "--dtypes", "bf16", "--budget", "0.01",
                       "--reps", "2", "--backends", "cublas,reference,dequant+cublas,torch-int4pack", "--no-plot",
                       "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    got = {(p["backend"], p["m"]) for p in doc["results"] if p.get("ms")}
    assert {("cublas", 1), ("reference", 3), ("dequant+cublas", 1), ("torch-int4pack", 3)} <= got
    assert all(p["rel_err"] < 1e-2 for p in doc["results"] if p.get("rel_err") is not None)
    assert doc["env"]["torch"] == torch.__version__ and doc["bandwidth"]["gbps"] > 0
    assert doc["left_out"] == []


def test_kernels_stopped_run_names_what_it_never_reached(tmp_path, monkeypatch):
    """A sweep killed mid-way (a stage time limit) keeps its finished shapes, and its JSON
    lists the shapes it never reached, so a partial merge cannot pass for a full one."""
    out = tmp_path / "k.json"
    real, calls = kernels.run_shape, []

    def stop_at_second_shape(*a, **kw):
        calls.append(a[:3])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what the timeout's SIGTERM / SIGKILL leaves behind
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "run_shape", stop_at_second_shape)
    with pytest.raises(KeyboardInterrupt):
        kernels.main(["--device", "cpu", "--shapes", "64x256,32x128", "--ms", "1", "--dtypes", "fp16",
                      "--budget", "0.01", "--reps", "2", "--backends", "reference", "--no-plot", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert {p["n"] for p in doc["results"]} == {64}
    assert doc["left_out"] == ["32x128 32x128 fp16 (not reached: the run was stopped)"]


@pytest.mark.slow
def test_e2e_decode_loop_matches_generate():
    """The benchmark's StaticCache decode loop produces exactly model.generate's greedy tokens."""
    pytest.importorskip("transformers")
    cfg = e2e.llama_config("tiny")
    model = e2e.build_dense(cfg, torch.device("cpu"), torch.float32)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    trace = []
    r = e2e.decode_tok_s(model, 2, 5, 3, 64, torch.device("cpu"), torch.float32, prompt=prompt, trace=trace)
    got = torch.cat(trace, dim=1)  # prefill token, 2 warm-ups, 2 more warm-ups, 3 timed steps
    assert got.shape == (2, 8) and r["method"] == "eager" and r["tok_s"] > 0
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref[:, 5:])


@pytest.mark.slow
def test_e2e_cpu_dry_run(tmp_path):
    """fp16 -> replace_linear and the direct-int4 (70B-style) build, end to end on CPU, tiny model."""
    pytest.importorskip("transformers")
    out = tmp_path / "e.json"
    common_args = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--batches", "2", "--prompt-len", "2",
                   "--decode-steps", "1", "--prefill-len", "8", "--out", str(out)]
    assert e2e.main(common_args) == 0
    assert e2e.main(common_args + ["--weights", "int4"]) == 0
    doc = json.loads(out.read_text())
    assert [r["weights"].split()[0] for r in doc["runs"]] == ["fp32", "int4", "int4"]
    assert all(r["decode_bs2_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in doc["runs"])
    assert "directly" in doc["runs"][2]["notes"][0]
    assert "| tiny Llama (dry run) |" in report.e2e_markdown(doc)


@pytest.mark.slow
def test_kernels_triton_backend_under_interpreter(tmp_path):
    """The bench's Triton path (op with backend='triton'), GEMV and GEMM sizes, on the CPU interpreter."""
    from int4ops.kernels import triton_w4a16

    if not triton_w4a16.available(torch.device("cpu")):
        pytest.skip("Triton interpreter unavailable")
    out = tmp_path / "t.json"
    assert kernels.main(["--device", "cpu", "--shapes", "32x128", "--ms", "1,64", "--dtypes", "fp16", "--budget", "0.01",
                         "--reps", "1", "--backends", "triton", "--no-plot", "--out", str(out)]) == 0
    pts = [p for p in json.loads(out.read_text())["results"] if p["backend"] == "triton"]
    assert [p["m"] for p in pts] == [1, 64] and all(p["ms"] and p["rel_err"] < 2e-3 for p in pts)


def test_compare_two_runs():
    from bench import compare

    def doc(ms):
        return {"env": {"date": "d", "gpu": "g"}, "results": [
            {"shape": "s", "m": 1, "dtype": "fp16", "backend": "triton", "ms": ms, "p10": ms * 0.98, "p90": ms * 1.02},
            {"shape": "s", "m": 2, "dtype": "fp16", "backend": "triton", "ms": 1.0, "p10": 0.99, "p90": 1.01},
        ]}

    rows = compare.compare(doc(1.0), doc(1.1))
    assert [r["agrees"] for r in rows] == [False, True]  # 9.5% apart vs a 4% spread; identical
    assert "2 common points" in compare.summary(rows) and "50% within their own reported spread" in compare.summary(rows)


def _run_doc(times: dict, date: str, spread: float = 0.01) -> dict:
    """A kernels JSON with one point per (backend, m, group_size) -> median ms; p10/p90 = ms -+ spread."""
    res = [{"shape": "8B o", "n": 4096, "k": 4096, "m": m, "dtype": "fp16", "group_size": gs, "sym": False, "backend": b,
            "bytes": common.point_bytes("dense" if b == "cublas" else "int4", m, 4096, 4096), "flops": common.flops(m, 4096, 4096),
            "note": "", "ms": ms, "p10": ms * (1 - spread), "p90": ms * (1 + spread), "reps": 25}
           for (b, m, gs), ms in times.items()]
    return {"kind": "kernels", "env": {"gpu": "NVIDIA H200", "date": date}, "method": "m", "args": {"group_size": 128},
            "bandwidth": {"gbps": 4000.0}, "matmul_peak": {"fp16": {"tflops": 700.0}}, "skipped": [], "left_out": [],
            "results": res}


def test_repro_merge_medians_spread_and_speedup():
    from bench import repro

    # 12 triton points (enough for a per-backend floor) whose two runs differ by 2%, and cuBLAS at M = 1.
    run1 = {("triton", m, 128): 0.010 for m in range(1, 13)} | {("cublas", 1, 128): 0.020}
    run2 = {("triton", m, 128): 0.0102 for m in range(1, 13)} | {("cublas", 1, 128): 0.020}
    merged = repro.merge([_run_doc(run1, "d1"), _run_doc(run2, "d2")])
    tri = next(p for p in merged["results"] if p["backend"] == "triton" and p["m"] == 1)
    cub = next(p for p in merged["results"] if p["backend"] == "cublas")
    assert tri["ms"] == pytest.approx(0.0101) and tri["run_ms"] == [0.010, 0.0102]
    # floor: sqrt(3) x the 90th percentile of |run - ms| / ms = sqrt(3) x 0.0001 / 0.0101
    floor = 3 ** 0.5 * 0.0001 / 0.0101
    assert merged["repro"]["floor"]["triton"] == pytest.approx(floor)
    assert "cublas" not in merged["repro"]["floor"]  # one point: the pooled floor applies
    assert tri["lo"] == pytest.approx(min(0.010 * 0.99, 0.0101 * (1 - floor)))
    assert tri["hi"] == pytest.approx(max(0.0102 * 1.01, 0.0101 * (1 + floor)))
    assert tri["lo"] <= min(tri["run_ms"]) and tri["hi"] >= max(tri["run_ms"])
    assert tri["speedup"] == pytest.approx(0.020 / 0.0101)  # from the merged medians
    assert tri["speedup_lo"] == pytest.approx(cub["lo"] / tri["hi"]) and tri["speedup_hi"] == pytest.approx(cub["hi"] / tri["lo"])
    assert "merged over 2 runs" in merged["method"] and [r["date"] for r in merged["runs"]] == ["d1", "d2"]
    assert "Reported spread across 2 runs" in report.kernels_markdown(merged)


def test_repro_check_flags_a_run_outside_the_spread(tmp_path):
    from bench import repro

    times = {("triton", m, 128): 0.010 for m in (1, 2, 3, 4)}
    merged = repro.merge([_run_doc(times, "d1"), _run_doc(times, "d2")])  # identical runs: lo/hi = p10/p90 (+-1%)
    inside = _run_doc({k: 0.01005 for k in times}, "d3")
    rows = repro.check(merged, inside)
    assert len(rows) == 4 and all(r["inside"] for r in rows)
    outside = _run_doc({**{k: 0.01005 for k in times}, ("triton", 4, 128): 0.0105}, "d3")  # 5% off at M = 4
    rows = repro.check(merged, outside)
    assert [r["inside"] for r in rows] == [True, True, True, False]
    text, ok = repro.check_summary(rows, 0.9)
    assert not ok and "FAIL: 3/4 points (75.0%)" in text
    assert repro.check_summary(rows, 0.75)[1]
    # Matching is on dtype, group size, sym, backend, N, K, M: a g64 point is not the g128 one.
    assert repro.check(merged, _run_doc({("triton", 1, 64): 0.5}, "d3")) == []
    # A single run's spread is its p10..p90 (the old method); the CLI exits 1 below --min-agree, 2 on a merged run.
    paths = {}
    for name, doc in (("merged", merged), ("out", outside), ("single", _run_doc(times, "d1", spread=0.001)), ("d2", _run_doc(times, "d2"))):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(doc))
    assert repro.main(["check", str(paths["merged"]), str(paths["out"])]) == 1
    assert repro.main(["check", str(paths["merged"]), str(paths["out"]), "--min-agree", "0.7"]) == 0
    assert [r["inside"] for r in repro.check(_run_doc(times, "d1", spread=0.001), outside)] == [False] * 4
    assert repro.main(["check", str(paths["merged"]), str(paths["d2"])]) == 2
    assert repro.main(["merge", str(paths["single"]), str(paths["out"]), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["repro"]["runs"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_launches_needs_a_gpu(capsys):
    from bench import launches

    assert launches.main(["--ms", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_launches_on_gpu(tmp_path):
    from bench import launches

    out = tmp_path / "launches.txt"
    assert launches.main(["--shapes", "512x384", "--ms", "1,16", "--replays", "1", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all("us/call" in line and "kernel" in line for line in lines[1:])
