"""The benchmarks run and write well-formed results (tiny sizes; no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]


LIBRARIES = ["nonprivate", "nonprivate-opacus-model", "dpclip", "dpclip-lowmem", "dpclip-vmap", "opacus-hooks",
             "opacus-functorch", "opacus-ghost"]


def _check_compare_smoke(tmp_path, stem, models):
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    results = report["results"]
    expected = {(m, lib) for m in models for lib in LIBRARIES}
    assert {(r["model"], r["library"]) for r in results} == expected
    assert list(report["settings"]["models"]) == models
    for r in results:
        assert "error" not in r, r
        assert r["ms_per_step"] > 0 and r["examples_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["peak_heap_mb"] < r["peak_rss_mb"]  # glibc's heap in use: part of the resident memory
        steps = [step for repeat in r["repeats"] for step in repeat["heap_steps"]]  # first and last of each repeat
        assert len(steps) == 2 * len(r["repeats"]) and all(0 < s["start_mb"] <= s["peak_mb"] for s in steps)
        expected = report["settings"]["batch"]
        scaled = [s["start_mb"] + (s["peak_mb"] - s["start_mb"]) * expected / s["batch"] for s in steps]
        assert r["peak_heap_mb"] == pytest.approx(max(scaled))  # each step's growth brought to the expected batch
        if not r["library"].startswith("nonprivate"):
            assert r["epsilon"] > 0
    # Same (q, σ, steps) → the same ε, each library by its own tight accountant (dpclip PLD, Opacus PRV).
    eps = {r["epsilon"] for r in results if r["epsilon"] is not None}
    assert max(eps) / min(eps) < 1.02
    assert {r["note"] for r in results if r["library"] == "dpclip"} == {"layerwise"}
    assert (tmp_path / f"{stem}.md").read_text().startswith("| model |")
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    return report


def test_compare_opacus_smoke(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_opacus.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    report = _check_compare_smoke(tmp_path, "compare_opacus_smoke_cpu", ["mlp", "cnn", "transformer", "resnet"])
    assert report["settings"]["suite"] == "default"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="retain_freed_memory needs glibc")
def test_compare_opacus_retained_memory_smoke(tmp_path):
    """--retain-memory: every run (every library) retains freed memory; its own results file; page faults counted."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_opacus.py"), "--smoke", "--retain-memory",
                    "--models", "mlp", "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    report = _check_compare_smoke(tmp_path, "compare_opacus_smoke_cpu_retained", ["mlp"])
    assert report["settings"]["retain_memory"] is True
    assert all(r["page_faults_per_step"] >= 0 for r in report["results"])
    assert "retain_freed_memory" in (tmp_path / "compare_opacus_smoke_cpu_retained.md").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="retain_freed_memory needs glibc")
def test_page_faults_smoke():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "page_faults.py"), "--smoke", "--models", "mlp", "cnn"],
                          check=True, capture_output=True, text=True, timeout=600)
    rows = [line.split(" | ")[:2] for line in done.stdout.splitlines() if line.startswith("| mlp") or line.startswith("| cnn")]
    assert rows == [[f"| {m}", s] for m in ("mlp", "cnn") for s in
                    ("nonprivate", "nonprivate-retained", "dpclip-whole", "dpclip", "dpclip-whole-retained", "dpclip-retained")]


def test_compare_opacus_scale_suite_smoke(tmp_path):
    """--suite scale: the larger transformer and the embedding-heavy model (smoke sizes), in their own file."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_opacus.py"), "--suite", "scale", "--smoke",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    assert not (tmp_path / "compare_opacus_smoke_cpu.json").exists()  # the default suite's file is not touched
    report = _check_compare_smoke(tmp_path, "compare_opacus_scale_smoke_cpu", ["transformer-large", "embedding"])
    assert report["settings"]["suite"] == "scale"
    notes = {(r["model"], r["library"]): r["note"] for r in report["results"]}
    assert notes[("transformer-large", "opacus-ghost")] == "ModuleValidator.fix"  # Opacus gets DPMultiheadAttention


def test_accountant_speed_runs(tmp_path):
    """The results file the README's accountant tables are rendered from: every library's ε of the same history
    agrees, dpclip's PLD is never below dp_accounting's pessimistic PLD by more than its own error bound."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accountant_speed.py"), "--repeats", "2", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "accountant_speed.json").read_text())
    values = [row["epsilon"] for row in report["rdp_speed"].values()]
    assert len(values) == 5 and max(values) - min(values) < 1e-3  # all RDP accountants agree on ε ≈ 6.71
    for table in report["pld_speed"].values():
        values = [row["epsilon"] for row in table.values()]
        assert max(values) - min(values) < 0.02  # PLDs and Opacus's PRV (eps_error 0.01)
    assert len(report["agreement"]) == 4
    for row in report["agreement"].values():
        assert row["pld"] <= row["rdp"]
        assert abs(row["pld"] - row["dp_accounting_pld"]) < 1e-3 <= row["pld_error"]
    small = report["small_delta"]
    assert small["dp_accounting_pld"] - 1e-3 <= small["pld"] <= small["rdp"]
    assert small["prv_accountant_lower"] <= small["pld"] <= small["prv_accountant_upper"] + 0.01
    assert small["sigma_pld"] < small["sigma_rdp"]
    assert (tmp_path / "accountant_speed.md").read_text().startswith("# Accountants")


def test_audit_tightness_smoke(tmp_path):
    """The results file README § Auditing is rendered from: the exact Gaussian ε against dp_accounting's PLD of one
    Gaussian mechanism, the Laplace mechanism's pure ε = 1/b, every bound below its claim."""
    dpa = pytest.importorskip("dp_accounting")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "audit_tightness.py"), "--seeds", "2", "--trials", "20000",
                    "--planted-trials", "20000", "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "audit_tightness.json").read_text())
    oracle = dpa.pld.PLDAccountant(value_discretization_interval=1e-5).compose(dpa.GaussianDpEvent(1.2)).get_epsilon(1e-5)
    gaussian, laplace = report["summary"]["gaussian"], report["summary"]["laplace"]
    assert gaussian["exact_epsilon"] == pytest.approx(oracle, abs=2e-3)
    assert gaussian["claimed_epsilon"] >= gaussian["exact_epsilon"] - 1e-9  # the engine's claim is an upper bound
    assert laplace["exact_epsilon"] == pytest.approx(1 / 1.2) and laplace["claimed_epsilon"] == pytest.approx(1 / 1.2)
    assert len(report["runs"]) == 4 and gaussian["violations"] == laplace["violations"] == 0
    assert all(0 < r["lower_bound"] < r["claimed_epsilon"] for r in report["runs"])
    planted = {(r["norm"], r["bug"]): r for r in report["planted"]["runs"]}
    for norm in ("l2", "l1"):  # the reused noise is caught; the unmodified engine's audit stays below its claim
        bug, honest = planted[norm, "reused noise"], planted[norm, None]
        assert bug["claimed_epsilon"] == honest["claimed_epsilon"]
        assert bug["violated"] and bug["lower_bound"] > bug["claimed_epsilon"]
        assert not honest["violated"] and honest["lower_bound"] < honest["claimed_epsilon"]
    assert (tmp_path / "audit_tightness.md").read_text().startswith("# The audit's lower bound")


def test_conv_routes_smoke(tmp_path):
    """The benchmark behind the conv rule's threshold: both routes give the same gradients, the pick is recorded."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conv_routes.py"), "--smoke", "--repeats", "1", "--calls", "2",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "conv_routes.json").read_text())
    picks = {r["label"]: (r["picked"], r["patches_built"]) for r in report["shapes"]}
    # conv 1: T = 196 > 16 at stride 2 (its patches would be built by phases: rows of 14 > k·C_in = 8);
    # conv 2: T = 25 ≤ 32 (rows of 5 < k·C_in = 64: channels-last)
    assert picks == {"DP CNN conv 1": ("weight_backward", "phases"), "DP CNN conv 2": ("patches", "channels-last")}
    assert all(r["same_gradients"] and min(r["ms"].values()) > 0 for r in report["shapes"])
    assert (tmp_path / "conv_routes.md").read_text().startswith("# A convolution's per-example weight gradients")


def test_noise_draw_smoke(tmp_path):
    """The noise benchmark times real draws of the right size and law, and derives the floor from them."""
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "noise_draw.py"))
    params = [torch.zeros(300, 200), torch.zeros(200)]
    methods = bench["noise_methods"](params, 4)
    released = methods["dpclip"]()  # {name: zero sum + N(0, (σC/B)²)} with σ = C = 1, B = 4
    values = torch.cat([v.flatten() for v in released.values()])
    assert values.numel() == 60_200 and abs(float(values.std()) - 0.25) < 0.01
    assert all(methods[f"numpy {name}"]().shape == (60_200,) for name in bench["NUMPY_GENERATORS"])
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "noise_draw.py"), "--smoke", "--models", "mlp",
                    "--repeats", "1", "--calls", "2", "--steps", "2", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    row = json.loads((tmp_path / "noise_draw.json").read_text())["models"][0]
    assert row["parameters"] == 256 * 784 + 256 + 256 * 256 + 256 + 10 * 256 + 10  # the small MLP 784-256-256-10
    assert min(row["ms"].values()) > 0
    assert row["noise_floor_ratio"] == pytest.approx(1 + row["ms"]["dpclip"] / row["nonprivate_step_ms"])


def test_accuracy_comparison_smoke(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_opacus.py"), "--accuracy", "--smoke",
                    "--epsilons", "3", "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "accuracy_digits_smoke.json").read_text())
    runs = {r["library"]: r for r in report["runs"]}
    assert set(runs) == {"dpclip", "opacus"}
    # Same σ, q and steps; each library's own accountant must then report (nearly) the same ε, at most the target.
    assert runs["dpclip"]["sigma"] == runs["opacus"]["sigma"]
    assert runs["dpclip"]["steps"] == runs["opacus"]["steps"] == runs["dpclip"]["planned_steps"]
    assert runs["dpclip"]["epsilon"] <= 3.0
    assert runs["opacus"]["epsilon"] == pytest.approx(runs["dpclip"]["epsilon"], rel=0.02)  # PRV vs PLD
    for r in runs.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0


def test_loader_workers_smoke():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_workers.py"), "--smoke"],
                          check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert set(report["results"]) == {"dpclip-w0", "dpclip-w2", "torch-w0", "torch-w2"}
    assert all(r["median_examples_per_s"] > 0 for r in report["results"].values())


def test_compare_opacus_bf16_autocast_smoke(tmp_path):
    """--autocast bf16: the forward under bf16 autocast, results in *_bf16 files, recorded in the settings."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_opacus.py"), "--smoke", "--autocast", "bf16",
                    "--models", "transformer", "--libraries", "nonprivate", "dpclip", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "compare_opacus_smoke_cpu_bf16.json").read_text())
    assert report["settings"]["autocast"] == "bf16"
    assert [(r["library"], "error" in r) for r in report["results"]] == [("nonprivate", False), ("dpclip", False)]
    assert "bf16 autocast" in (tmp_path / "compare_opacus_smoke_cpu_bf16.md").read_text()


def test_channels_last_exactness():
    """dpclip's step on the Fashion-MNIST CNN with channels-last activations equals the brute-force clipped mean
    (each example's gradient alone, clipped at C, summed), as it does in the default layout; C clips most examples."""
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "channels_last.py"))
    rows = bench["exactness"](["dpclip"])
    assert {r["layout"] for r in rows} == {"default", "channels_last"}
    assert all(r["relative_error"] < 1e-4 and r["max_abs_reference"] > 0 for r in rows)
    model = bench["build"]("channels_last")
    x = torch.randn(8, 1, 28, 28)
    assert not model.features[2](model.features[1](model.features[0](x))).is_contiguous()  # really channels-last
    plain = bench["build"]("default")
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))  # the same function
    # the clip is active: most examples' gradients are longer than C, so an unclipped mean would not pass
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(
        torch.nn.functional.cross_entropy(plain(x[i:i + 1]), torch.tensor([i % 10])), list(plain.parameters()))))
        for i in range(8)]
    assert sum(float(n) > bench["CLIP"] for n in norms) >= 6
