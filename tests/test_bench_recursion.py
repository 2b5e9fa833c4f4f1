"""`forge bench recursion` runs both studies end to end on a tiny budget; its numbers are recomputable from the
per-question answers it keeps, and its variants are the models they claim (parameters, cycles, ACT)."""
import json

import pytest

from forgelib.bench import recursion
from forgelib.bench.options import RECURSION_SPECIALISTS, RECURSION_TRUNKS


def test_both_studies_report_every_variant_with_paired_numbers(tmp_path):
    out = tmp_path / "recursion.json"
    assert recursion.main(["--seeds", "1", "--steps", "6", "--specialist-steps", "4", "--per-family", "2",
                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    trunks = {r["variant"]: r for r in run["trunks"]}
    special = {r["variant"]: r for r in run["specialists"]}
    assert set(trunks) == set(RECURSION_TRUNKS) and set(special) == set(RECURSION_SPECIALISTS)
    base = trunks["trunk-T1"]
    # equal parameters where the shape is the same (ACT off drops only the halting head: hidden size + 1)
    assert trunks["trunk-T2"]["params"] == base["params"] == special["T2"]["params"]
    assert base["params"] - trunks["trunk-T2-noact"]["params"] == 64 + 1  # the smoke set's hidden size 64
    assert trunks["deep-T1"]["params"] > base["params"] > trunks["shallow-T2-noact"]["params"]
    for rows, cycles_of in ((run["trunks"], lambda v: RECURSION_TRUNKS[v][1]),
                            (run["specialists"], lambda v: RECURSION_SPECIALISTS[v][0])):
        for row in rows:
            t = row["trained_cycles"]
            assert t == cycles_of(row["variant"])
            assert set(row["accuracy"]) == ({"1", str(t), str(2 * t)} if rows is run["trunks"] else {"1", "2", "4"})
    for row in run["trunks"] + run["specialists"]:
        t = row["trained_cycles"]
        assert row["accuracy"][str(t)] == round(sum(row["correct"]) / len(row["correct"]), 4)
        assert ("gain_trained_vs_1" in row) is (t > 1)
    assert base["n"] == 7 * 2 and special["T1"]["n"] == 2 * 2 * 2  # 7 trunk families; multistep + algebra, twice
    for rows, ref in ((run["trunks"], base), (run["specialists"], special["T1"])):
        for row in rows:
            if row is not ref:
                diff = sum(row["correct"]) / row["n"] - sum(ref["correct"]) / ref["n"]
                key = f"minus_{ref['variant']}"
                assert row[key]["diff"] == pytest.approx(diff, abs=1e-4)
                assert row[key]["lower_bound"] <= row[key]["diff"]
    assert report["summary"]["trunks"]["trunk-T1"]["accuracy"] == [base["accuracy"]["1"]]


def test_an_unknown_variant_is_named(capsys):
    with pytest.raises(SystemExit):
        recursion.main(["--trunks", "trunk-T3"])
    assert "unknown variant(s) ['trunk-T3']" in capsys.readouterr().err


def test_the_trunks_can_study_sudoku_without_worked_steps(tmp_path, capsys):
    """``--mix sudoku --levels 1,2 --no-steps``: the trunks train and are asked the benchmark family alone (the
    whole grid as the answer, no worked steps); the report says so; a malformed mix, an unknown family, or (b)
    asked beside another mix is named."""
    out = tmp_path / "recursion.json"
    assert recursion.main(["--seeds", "1", "--steps", "4", "--per-family", "3", "--trunks", "trunk-T2-noact",
                           "--specialists", "", "--mix", "sudoku", "--levels", "1,2", "--no-steps",
                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mix"] == {"sudoku": 1.0} and report["levels"] == [1, 2] and report["with_steps"] is False
    (row,) = report["runs"][0]["trunks"]
    assert row["variant"] == "trunk-T2-noact" and row["n"] == 3 and report["runs"][0]["specialists"] == []
    assert recursion.parse_mix("sudoku:2, arith") == {"sudoku": 2.0, "arith": 1.0}
    for bad, said in (("sudoku:x", "not family[:weight]"), ("sudok", "sudok"), ("arith:0", "positive weight")):
        with pytest.raises(SystemExit):
            recursion.main(["--seeds", "1", "--mix", bad, "--specialists", "", "--out", str(out)])
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (b)'s fine-tunes replay the trunk's mix: not with another mix
        recursion.main(["--seeds", "1", "--mix", "sudoku", "--out", str(out)])
    assert "pass --specialists '' with --mix" in capsys.readouterr().err
