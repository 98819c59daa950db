"""The op benchmark runs end to end on tiny shapes (untimed: it only must not rot)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ops_tiny(tmp_path):
    out_json = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_ops.py"), "--tiny", "--no-compile", "--repeats", "3",
         "--warmup", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "copy bandwidth" in result.stdout and "global dot" in result.stdout
    data = json.loads(out_json.read_text())
    names = {r["name"] for r in data["results"]}
    assert any("hkconv shared" in n for n in names) and any("global conv" in n for n in names)
    for r in data["results"]:
        assert r["fwdbwd"]["ours"] > 0 and r["fwdbwd"]["eager"] > 0
        assert set(r["peak_mb"]) >= {"ours", "eager"}


def test_train_speed_tiny(tmp_path):
    """tools/train_speed.py: both backends' workers and the step profile, on a tiny batch."""
    out_json = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_speed.py"), "--preset", "mnist1d", "--batch-size", "4",
         "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1", "--profile", "--profile-steps", "1",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "compiled / reference" in result.stdout and "profile of one training step" in result.stdout
    data = json.loads(out_json.read_text())
    assert set(data["samples_per_s"]) == {"cpp", "reference"} and data["ratio"] > 0
    assert data["profile"]["total_ms"] > 0 and data["profile"]["groups"]
