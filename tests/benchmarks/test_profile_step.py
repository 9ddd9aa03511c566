"""benchmarks/profile_step.py runs and reports every phase of the step (tiny sizes; no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "profile_step.py"
PHASES = ["load", "forward", "backward_autograd", "norms_clipped_sum", "noise", "optimizer", "other"]
MODELS = ["mlp", "cnn", "transformer", "resnet"]


def test_profile_step_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], check=True, capture_output=True, text=True,
                          timeout=300, env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(report["phases"]) == PHASES
    results = {(r["model"], r["library"]): r for r in report["results"]}
    assert set(results) == {(m, lib) for m in MODELS for lib in ["nonprivate", "dpclip"]}
    for (model, library), r in results.items():
        phases = r["phases_ms"]
        assert list(phases) == [*PHASES, "total"]
        timed = [p for p in PHASES if library == "dpclip" or p not in ("norms_clipped_sum", "noise")]
        assert all(phases[p] > 0 for p in timed), (model, library, phases)
        assert phases["total"] > 0 and len(r["repeats"]) == 1
        assert sum(phases[p] for p in PHASES) > 0.5 * phases["total"]  # the phases make up the step
        if library == "dpclip":
            assert r["path"] == "layerwise"
            assert r["detail_ms"]["norms"] > 0 and r["detail_ms"]["weighted_sum"] > 0
            assert r["detail_ms"]["norms"] + r["detail_ms"]["weighted_sum"] <= phases["norms_clipped_sum"]
        else:
            assert phases["norms_clipped_sum"] == phases["noise"] == 0
    assert [p["model"] for p in report["profiles"]] == MODELS
    for p in report["profiles"]:
        assert 0 < len(p["top"]) <= 10 and all(e["self_cpu_ms"] > 0 and e["op"] for e in p["top"])
    s = report["settings"]
    assert s["command"].endswith("python benchmarks/profile_step.py --smoke") and s["size"] == "smoke"
    assert Path(s["dpclip_file"]).is_file() and s["threads"] == 1
    for title in ["norms + clipped sum", "noise", "torch.profiler", "| mlp | dpclip |"]:
        assert title in done.stdout

    # --compare renders the before/after table from two results files
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(report))
    table = subprocess.run([sys.executable, str(SCRIPT), "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                           check=True, capture_output=True, text=True, timeout=60).stdout
    assert table.startswith("| model | run |") and table.count("| resnet | dpclip,") == 2
