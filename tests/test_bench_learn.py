"""`forge bench learn` runs end to end on a tiny budget and reports curves that line up in time."""
import json

from forgelib.bench import learn


def test_mean_at_is_the_last_evaluation_reached():
    curve = [{"train_seconds": 1.0, "mean": 0.1}, {"train_seconds": 2.0, "mean": 0.4}, {"train_seconds": 3.0,
                                                                                        "mean": 0.5}]
    assert learn.mean_at(curve, 0.5) == 0.0
    assert learn.mean_at(curve, 2.5) == 0.4
    assert learn.mean_at(curve, 3.0) == 0.5


def test_learning_curves_of_every_contender(tmp_path):
    out = tmp_path / "learn.json"
    assert learn.main(["--seeds", "1", "--seconds", "1", "--points", "2", "--eval-per-family", "1",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == set(learn.CONTENDERS)
    for run in report["runs"]:
        assert run["steps"] >= 2 and len(run["curve"]) >= 2
        times = [p["train_seconds"] for p in run["curve"]]
        tokens = [p["tokens"] for p in run["curve"]]
        assert times == sorted(times) and tokens == sorted(tokens) and tokens[0] > 0
        assert len(run["final_accuracy"]) == 7  # every family of the trunk mix
    llama = next(r for r in report["runs"] if r["contender"] == "llama")
    cognate = next(r for r in report["runs"] if r["contender"] == "cognate")
    assert abs(llama["params"] - cognate["params"]) / cognate["params"] < 0.15  # same shape, similar size
    assert report["common_seconds"] <= min(r["train_seconds"] for r in report["runs"])
