"""benchmarks/lab_pe.py and lab_pe_bound.py: table assembly from synthetic records, seed spread and
intervals against re-derivations, bound marking, argument errors, one tiny end-to-end run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import lab_pe  # noqa: E402
import lab_pe_bound  # noqa: E402

Z = 1.959963984540054


def wilson_ref(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def ppl_rec(encoding: str, method: str, seed: int, length: int, shift: float, trained: int = 128) -> dict:
    nll = [2.0 + shift + 0.1 * i for i in range(4)]
    ref = [2.0 + 0.05 * i for i in range(4)]
    return {"task": "ppl", "encoding": encoding, "method": method, "seed": seed, "length": length, "trained": trained,
            "nll": [x * length for x in nll], "tokens": [length] * 4, "nll_past": [x * 10 for x in nll], "tokens_past": [10] * 4,
            "ref_nll_past": [x * 10 for x in ref], "ref_tokens_past": [10] * 4}


def key_rec(encoding: str, method: str, seed: int, length: int, correct: int, trials: int = 10, trained: int = 128,
            depth: float = 0.0, n_keys: int = 1, base: float = 10000.0) -> dict:
    return {"task": "passkey", "encoding": encoding, "method": method, "seed": seed, "length": length, "trained": trained,
            "depth": depth, "correct": correct, "trials": trials, "n_keys": n_keys, "base": base}


def test_ppl_summary_ratio_mean_and_spread_over_seeds():
    recs = [ppl_rec("rope", "none", 0, 256, 0.2), ppl_rec("rope", "none", 1, 256, 0.4)]
    ratios = [math.exp(sum(r["nll_past"]) / 40 - sum(r["ref_nll_past"]) / 40) for r in recs]
    s = lab_pe.ppl_summary(recs)
    assert s.mean == pytest.approx(sum(ratios) / 2)
    assert s.spread == pytest.approx((ratios[1] - ratios[0]) / 2)
    assert s.low <= min(ratios) and s.high >= max(ratios) and s.n == 4 and s.seeds == 2


def test_ppl_summary_at_trained_length_is_the_ppl():
    rec = ppl_rec("rope", "none", 0, 128, 0.3)
    s = lab_pe.ppl_summary([rec])
    assert s.mean == pytest.approx(math.exp(sum(rec["nll"]) / sum(rec["tokens"])))
    assert s.spread == 0 and s.low <= s.mean <= s.high


def test_passkey_summary_pools_trials_and_spreads_seeds():
    recs = [key_rec("rope", "none", 0, 256, 4, depth=0.0), key_rec("rope", "none", 0, 256, 3, depth=1.0),
            key_rec("rope", "none", 1, 256, 9, depth=0.0), key_rec("rope", "none", 1, 256, 10, depth=1.0)]
    s = lab_pe.passkey_summary(recs)
    assert s.mean == pytest.approx((0.35 + 0.95) / 2) and s.spread == pytest.approx(0.3)
    low, high = wilson_ref(26, 40)
    assert (s.low, s.high, s.n, s.seeds) == (pytest.approx(low), pytest.approx(high), 20, 2)


def test_summaries_refuse_empty():
    with pytest.raises(ValueError, match="no records"):
        lab_pe.ppl_summary([])
    with pytest.raises(ValueError, match="no records"):
        lab_pe.passkey_summary([])


def test_encodings_table_rows_columns_and_missing_cells():
    recs = [ppl_rec(e, m, s, L, 0.1 * s) for e, m in (("rope", "none"), ("rope", "yarn"), ("nope", "none"))
            for s in (0, 1) for L in (128, 256)]
    recs = [r for r in recs if not (r["encoding"] == "nope" and r["length"] == 256)]
    recs += [key_rec("rope", "none", s, L, 5) for s in (0, 1) for L in (128, 256)]
    recs += [{"task": "train", "encoding": "rope", "seed": s, "trained": 128, "final_loss": 1.0 + s, "passkey_train_exact": 0.5,
              "pretrain_seconds": 10.0, "finetune_seconds": 20.0} for s in (0, 1)]
    text = lab_pe.encodings_table(recs)
    lines = text.splitlines()
    assert "PPL @128 (1x)" in lines[0] and "ratio @256 (2x)" in lines[0]
    labels = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "model" not in line]
    assert labels[:3] == ["rope", "rope + yarn", "nope"]
    nope = next(line for line in lines if line.startswith("| nope |"))
    assert nope.rstrip(" |").endswith("—")
    assert "passkey @256 (2x, n=2x10)" in text
    assert "| rope | 1.5 ±0.5 |" in text


def test_encodings_table_refuses_mixed_trained_lengths():
    with pytest.raises(ValueError, match="one trained length"):
        lab_pe.encodings_table([ppl_rec("rope", "none", 0, 256, 0.1), ppl_rec("rope", "none", 0, 512, 0.1, trained=256)])


@pytest.mark.parametrize("base,side", [(50.0, "below"), (100.0, "between"), (150.0, "between"), (200.0, "above"), (999.0, "above")])
def test_bound_side(base, side):
    assert lab_pe_bound.bound_side(base, 100.0, 200.0) == side


def test_bound_side_without_feasible_or_stable_base():
    assert lab_pe_bound.bound_side(1e9, None, None) == "below"
    assert lab_pe_bound.bound_side(1e9, 10.0, None) == "between"


def test_bases_for_brackets_the_first_feasible_base():
    bound = {"trained": 128, "head_dim": 32, "first_feasible": 1220.2}
    assert lab_pe_bound.bases_for(bound, [0.25, 2]) == [305.0, 2440.0]
    with pytest.raises(ValueError, match="no feasible"):
        lab_pe_bound.bases_for({**bound, "first_feasible": None}, [2])


def test_bound_records_come_from_the_calculator_one_length_at_a_time():
    from rope_ext.calc import base_lower_bound

    alone = lab_pe_bound.bound_records([64], 16)
    both = lab_pe_bound.bound_records([64, 256], 16)
    ref = base_lower_bound(64, 16)
    assert (alone[0]["first_feasible"], alone[0]["stable"], alone[0]["trained"]) == (ref.first_feasible, ref.stable, 64)
    assert both[0] == alone[0] and both[1]["trained"] == 256


def test_bound_table_marks_sides_and_counts_depths(tmp_path):
    bound = {"task": "bound", "trained": 128, "head_dim": 32, "first_feasible": 1000.0, "stable": 2000.0, "certified_above": 5000.0}
    recs = [bound]
    for base, right in ((100.0, 1), (4000.0, 9)):
        recs += [key_rec("rope", "none", 0, 128, right, depth=d, base=base) for d in (0.0, 1.0)]
        recs += [key_rec("rope", "none", 0, 128, 2, depth=0.0, base=base, n_keys=2)]
        recs.append({"task": "train", "trained": 128, "base": base, "seed": 0, "final_loss": 1.5, "finetune_loss": 2.5, "passkey_train_exact": 0.9})
    text = lab_pe_bound.bound_table(recs)
    below = next(line for line in text.splitlines() if line.startswith("| 128 | 100 |"))
    above = next(line for line in text.splitlines() if line.startswith("| 128 | 4000 |"))
    assert "| below | 1.500 | 2.500 | 0.90 |" in below and "| 1/10 1/10 |" in below and "| 2/10 |" in below
    assert "| above |" in above and "| 9/10 9/10 |" in above
    assert "first feasible base 1000" in text
    assert lab_pe_bound.plot_bound(recs, tmp_path / "b.png").stat().st_size > 0


def test_plot_encodings_writes_png(tmp_path):
    recs = [ppl_rec("rope", "none", s, L, 0.1) for s in (0, 1) for L in (128, 256, 512)]
    recs += [key_rec("rope", "none", s, L, 5) for s in (0, 1) for L in (128, 256, 512)]
    assert lab_pe.plot_encodings(recs, tmp_path / "e.png").stat().st_size > 0


@pytest.mark.parametrize("argv,needle", [
    (["--encodings", "bogus"], "bogus"),
    (["--docs", "1"], "--docs"),
    (["--depths", "0,2"], "--depths"),
    (["--seeds", "x"], "--seeds"),
    (["--jobs", "0"], "--jobs"),
    (["--methods-on", "all"], "--methods-on"),
    (["--lengths", "0x"], "--lengths"),
])
def test_encodings_argument_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        lab_pe.parse_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_methods_on_picks_rope_based_encodings():
    chosen = lab_pe.available_encodings()
    assert lab_pe.methods_on("none", chosen) == [] and lab_pe.methods_on("rope", chosen) == ["rope"]
    based = lab_pe.methods_on("rope-based", chosen)
    assert based[0] == "rope" and "alibi" not in based and "nope" not in based
    if len(chosen) > len(lab_pe.BUILTIN):
        from rope_ext.eval import encodings

        assert set(based[1:]) == {e for e in encodings.names() if encodings.get(e).rope_based}


def test_unknown_encoding_error_lists_the_allowed(capsys):
    with pytest.raises(SystemExit):
        lab_pe.parse_args(["--encodings", "rope,bogus"])
    err = capsys.readouterr().err
    assert all(name in err for name in lab_pe.available_encodings())


@pytest.mark.parametrize("argv,needle", [
    (["--factors", "abc"], "--factors"),
    (["--factors", "-1"], "--factors"),
    (["--contexts", "4"], "--contexts"),
    (["--n-keys", "0"], "--n-keys"),
    (["--hidden", "30", "--heads", "4"], "--hidden"),
    (["--multi-key-fraction", "2"], "--multi-key-fraction"),
])
def test_bound_argument_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        lab_pe_bound.parse_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_tiny_end_to_end_run_is_resumable(tmp_path):
    """hidden 32, 5 steps, one encoding; T = 64 (the compact passkey prompt alone takes ~48 tokens)."""
    argv = ["--encodings", "rope", "--methods-on", "none", "--context", "64", "--hidden", "32", "--layers", "2", "--heads", "2",
            "--intermediate", "64", "--steps", "5", "--pk-steps", "5", "--docs", "2", "--trials", "2", "--depths", "0,1",
            "--lengths", "1x,2x", "--seeds", "0", "--jobs", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]
    assert lab_pe.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "lab_pe_encodings.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"train", "ppl", "passkey"}
    assert sorted({r["length"] for r in records if r["task"] == "ppl"}) == [64, 128]
    assert all(r["trials"] == 2 for r in records if r["task"] == "passkey")
    assert "| rope |" in (tmp_path / "out" / "lab_pe_encodings.md").read_text()
    assert (tmp_path / "out" / "lab_pe_encodings.png").stat().st_size > 0
    marks = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "checkpoints").glob("*/lab.json")}
    assert len(marks) == 2
    assert lab_pe.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
    again = [json.loads(line) for line in (tmp_path / "out" / "lab_pe_encodings.jsonl").read_text().splitlines()]
    assert again == records
