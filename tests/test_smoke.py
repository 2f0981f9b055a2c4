"""The GPU smoke check (``python -m astrea.smoke``) at its CPU size, through the Triton
interpreter: it must pass on correct kernels, cover every public op, and fail on wrong ones."""

import json

import pytest
import torch

import astrea
from astrea import ops, smoke

PUBLIC_OPS = sorted(name for name in ops.__all__ if name[0].islower())


@pytest.fixture
def calls(monkeypatch):
    """The public ops the smoke run calls (wrapped to count, still running)."""
    called = set()
    for name in PUBLIC_OPS:
        def counting(*args, __name=name, __op=getattr(ops, name), **kwargs):
            called.add(__name)
            return __op(*args, **kwargs)
        monkeypatch.setattr(ops, name, counting)
    return called


def test_smoke_passes_and_covers_every_public_op_in_every_dtype(tmp_path, calls):
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--sizes", "tiny", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert calls == set(PUBLIC_OPS)
    assert all(r["ok"] for r in records)
    assert {(r["op"], r["dtype"]) for r in records} == {(case.op, str(dtype)[6:]) for case in smoke.CASES
                                                         for dtype in smoke.DTYPES}
    gradients = {r["output"] for r in records if r["output"].startswith("grad ")}
    assert {"grad logits", "grad x", "grad expert_out", "grad gate_up", "grad down", "grad q"} <= gradients


def _one_case(monkeypatch, call):
    case = smoke.Case("perturbed", smoke._routed_make, call, {"tiny": dict(N=4, k=2, E=3, D=5)},
                      ("x", "expert_out", "weights", "expert_scale"))
    monkeypatch.setattr(smoke, "CASES", (case,))


def test_smoke_fails_a_floating_output_off_by_more_than_its_bound(tmp_path, monkeypatch, capsys):
    def call(size, indices, x, expert_out, weights, expert_scale):
        dispatch = ops.moe_dispatch(indices, size["E"])
        out = ops.weighted_combine(expert_out, weights, dispatch, expert_scale)
        # A kernel 5% off in its forward only (gradients untouched): past every dtype's bound.
        return {"combined": out + 0.05 * out.detach() if astrea.current_backend() == "triton" else out}

    _one_case(monkeypatch, call)
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--out", str(out)]) == 1
    records = json.loads(out.read_text())
    combined = [r for r in records if r["output"] == "combined"]
    assert combined and not any(r["ok"] for r in combined)
    assert all(r["error"] > r["bound"] for r in combined)
    # The gradients, untouched by the perturbation, still pass.
    assert all(r["ok"] for r in records if r["output"].startswith("grad "))
    assert "FAILED" in capsys.readouterr().out


def test_smoke_fails_an_integer_output_that_differs_and_records_errors(tmp_path, monkeypatch):
    def call(size, indices, x, expert_out, weights, expert_scale):
        dispatch = ops.moe_dispatch(indices, size["E"])
        if astrea.current_backend() != "triton":
            return {"offsets": dispatch.expert_offsets}
        if x.dtype == torch.float16:
            raise RuntimeError("kernel launch failed")
        return {"offsets": dispatch.expert_offsets + 1}

    _one_case(monkeypatch, call)
    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--out", str(out)]) == 1
    records = {r["dtype"]: r for r in json.loads(out.read_text())}
    assert records["float32"]["mismatches"] == 4 and not records["float32"]["ok"]
    assert records["float16"]["error"] == "RuntimeError: kernel launch failed"


def test_smoke_refuses_unknown_sizes():
    with pytest.raises(SystemExit):
        smoke.main(["--device", "cpu", "--sizes", "huge"])
