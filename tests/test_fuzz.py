"""Fuzzing the ops (tools/ci/fuzz_ops.py): a CI-sized sample in a worker subprocess.

Every case must equal the float64 reference or raise a clean ValueError / TypeError /
RuntimeError for invalid input; a crash or a hang of the worker fails with the case
named. TERMINATOR_FUZZ_CASES sets the sample size (default 300); the dedicated run is
``tools/ci/fuzz_ops.py --cases 5000``.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fuzz_ops", ROOT / "tools" / "ci" / "fuzz_ops.py")
fuzz_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_ops)

CASES = int(os.environ.get("TERMINATOR_FUZZ_CASES", "300"))


@pytest.fixture(scope="module")
def worker():
    with fuzz_ops.Worker(timeout=300) as w:
        yield w


@pytest.mark.slow
def test_fuzz_sample(worker):
    outcomes = collections.Counter()

    @settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=fuzz_ops.cases())
    def check(case):
        result = worker.run(case)
        outcomes[result["outcome"]] += 1
        assert result["ok"], (
            f"{result['outcome']}: {fuzz_ops.describe(case)}\n{result['detail']}\n"
            f"replay: tools/ci/fuzz_ops.py --replay <file with> {json.dumps(case)}"
        )

    check()
    print(f"fuzz sample on the {worker.backend} backend: {dict(outcomes)}")
    # The sample exercised both sides: values checked against the reference, bad input
    # rejected. On the reference backend the torch.ops entry is skipped (not registered).
    run = CASES - outcomes["skipped"]
    assert run >= CASES // 3, dict(outcomes)  # (about a third of the cases use that entry)
    assert outcomes["match"] >= run // 5 and outcomes["rejected"] >= run // 10, dict(outcomes)


def _case(**overrides):
    case = {
        "op": "conv",
        "entry": "python",
        "mode": None,
        "algo": "direct",
        "grad": True,
        "seed": 1,
        "mutations": [],
        "tensors": {
            "x": {
                "kind": "tensor",
                "shape": [2, 3, 7],
                "dtype": "float32",
                "device": "cpu",
                "layout": "sliced",
                "values": "normal",
                "expand_dim": 0,
                "perm_seed": 0,
            },
            "w": {
                "kind": "tensor",
                "shape": [3, 3],
                "dtype": "float32",
                "device": "cpu",
                "layout": "contiguous",
                "values": "normal",
                "expand_dim": 0,
                "perm_seed": 0,
            },
        },
    }
    case.update(overrides)
    return case


def test_a_crashing_case_is_caught_and_named():
    with fuzz_ops.Worker(timeout=120) as w:
        result = w.run(_case(selftest="abort"))
        assert not result["ok"] and result["outcome"] == "crash" and "SIGABRT" in result["detail"]
        assert w.run(_case())["outcome"] == "match"  # a fresh worker took over
        assert w.restarts == 1


def test_a_hanging_case_is_caught():
    with fuzz_ops.Worker(timeout=5) as w:
        w.run(_case())  # started (the first start may take longer than 5 s)
        result = w.run(_case(selftest="hang"))
        assert result["outcome"] == "hang" and not result["ok"]


def test_the_checks_catch_a_wrong_value(monkeypatch):
    import terminator.ops as ops

    assert fuzz_ops.run_case(_case())["outcome"] == "match"
    real = ops.hyperkernel_conv
    monkeypatch.setattr(ops, "hyperkernel_conv", lambda x, w, algo: real(x, w, algo=algo) * (1 + 1e-4))
    with pytest.raises(fuzz_ops.Finding, match="wrong value"):
        fuzz_ops.run_case(_case())


def test_the_checks_catch_an_accepted_invalid_input(monkeypatch):
    import terminator.ops as ops

    case = _case()
    case["tensors"]["w"]["dtype"] = "int32"
    assert fuzz_ops.validity(case) == "invalid"
    assert fuzz_ops.run_case(case)["outcome"] == "rejected"
    monkeypatch.setattr(ops, "hyperkernel_conv", lambda x, w, algo: torch.zeros_like(x))
    with pytest.raises(fuzz_ops.Finding, match="accepted an invalid input"):
        fuzz_ops.run_case(case)


def test_the_checks_catch_a_lost_nan(monkeypatch):
    import terminator.ops as ops

    case = _case(grad=False)
    case["tensors"]["x"]["values"] = "specials"
    assert fuzz_ops.run_case(case)["outcome"] == "match"
    real = ops.hyperkernel_conv
    monkeypatch.setattr(ops, "hyperkernel_conv", lambda x, w, algo: torch.nan_to_num(real(x, w, algo=algo)))
    with pytest.raises(fuzz_ops.Finding, match="non-finite"):
        fuzz_ops.run_case(case)


def test_the_oracle_follows_the_spec():
    assert fuzz_ops.validity(_case()) == "valid"
    zero_batch = _case()
    zero_batch["tensors"]["x"]["shape"] = [0, 3, 7]
    assert fuzz_ops.validity(zero_batch) == "valid"  # B = 0 must give an empty result
    zero_c = _case()
    zero_c["tensors"]["x"]["shape"], zero_c["tensors"]["w"]["shape"] = [2, 0, 7], [0, 3]
    assert fuzz_ops.validity(zero_c) == "empty_ok"
    too_big = _case()
    too_big["tensors"]["w"]["shape"] = [3, 8]
    assert fuzz_ops.validity(too_big) == "invalid"
    meta = _case()
    meta["tensors"]["w"]["device"] = "meta"
    assert fuzz_ops.validity(meta) == "invalid"
    assert fuzz_ops.validity(_case(algo="Direct")) == "invalid"
