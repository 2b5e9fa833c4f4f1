"""The inspectors driven through their widgets' controls: a real SQLite registry with two phases and a handoff, a
real tiny ternary model folder, real metrics.jsonl files."""
import json

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


def _text(html_widget) -> str:
    import html

    return html.unescape(html_widget.value)


@pytest.fixture
def registry_with_chain(tmp_path, tiny_llama):
    """Session s1: phase a makes model #1 (a folder), phase b is handed #1 and makes #2; session s2 failed."""
    from forgelib.registry import ModelRegistry

    reg = ModelRegistry(tmp_path / "reg.db")
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / name / "models" / "model"
        tiny_llama.save_pretrained(folder)
        folders.append(folder)
    reg.create_session("s1", {"params_file": "x.yaml"})
    run = reg.start_phase_run("s1", "a")
    reg.finish_phase_run(run, "completed", metrics={"acc": 0.5, "loss": 1.25})
    first = reg.register_model(session_id="s1", phase_name="a", model_name="model", model_path=str(folders[0]),
                               parameter_count=123)
    reg.record_handoff("s1", "a", first, "b", True, {"ok": True})
    run = reg.start_phase_run("s1", "b")
    reg.finish_phase_run(run, "completed", metrics={"acc": 0.75})
    second = reg.register_model(session_id="s1", phase_name="b", model_name="model", model_path=str(folders[1]),
                                parameter_count=123, metadata={"note": "child"})
    reg.update_session("s1", status="completed")
    reg.create_session("s2", {})
    reg.update_session("s2", status="failed")
    yield reg, first, second
    reg.close()


def test_registry_browser_filters_sessions_and_shows_lineage(registry_with_chain):
    from forgelib.viz.inspect import model_lineage, registry_browser, registry_tables

    reg, first, second = registry_with_chain
    assert [c["id"] for c in model_lineage(second, reg)] == [second, first]  # b's model came from a's
    tables = registry_tables(reg, "s1")
    assert list(tables["runs"].phase) == ["a", "b"] and list(tables["models"].id) == [first, second]
    box = registry_browser(reg)
    c = box.controls
    assert set(c["session"].options) == {"s1", "s2"}
    c["status"].value = "failed"
    assert list(c["session"].options) == ["s2"]
    c["status"].value = "completed"
    c["session"].value = "s1"
    assert "acc=0.75" in _text(c["tables"]) and len(c["model"].options) == 2
    c["model"].value = second
    details = _text(c["details"])
    assert "b/model" in details and "a/model" in details and "child" in details and "acc=0.75" in details
    assert details.index("b/model") < details.index("a/model")  # newest first


def test_model_inspector_counts_parameters_and_ternary_share(tmp_path, tiny_llama):
    from forgelib.quant import convert_to_bitnet
    from forgelib.quant.bitnet import ternary_quantize
    from forgelib.viz.inspect import inspect_model, model_inspector

    convert_to_bitnet(tiny_llama)
    folder = tmp_path / "m"
    tiny_llama.save_pretrained(folder)
    info = inspect_model(folder)
    assert info["parameters"] == sum(p.numel() for p in tiny_llama.parameters())
    assert info["per_kind"]["embeddings"] == tiny_llama.model.embed_tokens.weight.numel()
    row = next(r for r in info["matrices"] if r["name"] == "model.layers.0.mlp.up_proj.weight")
    codes = ternary_quantize(tiny_llama.model.layers[0].mlp.up_proj.weight.detach())[0]
    assert row["share_0"] == round(float((codes == 0).float().mean()), 4)
    assert row["share_-1"] + row["share_0"] + row["share_1"] == pytest.approx(1, abs=1e-3)
    box = model_inspector(folder)
    first = box.last_figure
    box.controls["matrix"].value = "model.layers.1.self_attn.q_proj.weight"
    assert box.last_figure is not first and "q_proj" in box.last_figure.axes[0].get_title()
    spectrum = box.last_figure.axes[1].lines[0].get_ydata()
    want = torch.linalg.svdvals(tiny_llama.model.layers[1].self_attn.q_proj.weight.detach().float()).numpy()
    assert spectrum == pytest.approx(want, rel=1e-4)


def test_model_inspector_reads_an_artifact_and_its_bits(tmp_path, tiny_llama):
    from forgelib.quant.artifact import artifact_report, save_compressed
    from forgelib.viz.inspect import inspect_model

    folder = tmp_path / "c"
    save_compressed(tiny_llama, folder / "model.forge", {"lm_head.weight": {"codec": "rtn", "bits": 4}})
    info = inspect_model(folder)
    assert info["artifact"]["bits_per_weight"] == round(artifact_report(folder / "model.forge")["bits_per_weight"], 4)
    assert info["artifact"]["weights_per_codec"]["rtn"] == tiny_llama.lm_head.weight.numel()


def test_metrics_explorer_overlays_runs(tmp_path):
    from forgelib.viz.inspect import load_metrics, metrics_explorer

    files = []
    for run, scale in (("r1", 1.0), ("r2", 2.0)):
        f = tmp_path / run / "01_x" / "metrics.jsonl"
        f.parent.mkdir(parents=True)
        f.write_text("\n".join(json.dumps({"step": s, "time": 0, "train/loss": scale / (s + 1), "flag": True})
                               for s in range(5)))
        files.append(f)
    frame = load_metrics(files)
    assert set(frame.metric) == {"train/loss"} and len(frame) == 10  # booleans and time are not metrics
    box = metrics_explorer(files)
    c = box.controls
    c["runs"].value = ("r1/01_x", "r2/01_x")
    assert list(c["metrics"].options) == ["train/loss"]
    c["metrics"].value = ("train/loss",)
    lines = box.last_figure.axes[0].lines
    assert [l.get_label() for l in lines] == ["r1/01_x", "r2/01_x"]
    assert list(lines[1].get_ydata()) == pytest.approx([2.0 / (s + 1) for s in range(5)])


def test_registry_browser_shows_each_models_status(registry_with_chain):
    from forgelib.viz.inspect import registry_browser, registry_tables

    reg, first, second = registry_with_chain
    reg.set_model_status([first], "retired", reason="its phase's gate failed")
    reg.set_model_status([second], "gate-failed", metadata={"failed_checks": ["acc"]})
    assert list(registry_tables(reg, "s1")["models"].status) == ["retired: its phase's gate failed", "gate-failed"]
    c = registry_browser(reg).controls
    c["session"].value = "s1"
    assert "retired: its phase's gate failed" in _text(c["tables"]) and "gate-failed" in _text(c["tables"])
    c["model"].value = first
    assert "(session s1), retired: its phase's gate failed" in _text(c["details"])
    # a retirement's reason as the pipeline writes it is shown whole, the parameter count as an integer
    reason = "registered by phase run 14 of 04_bitnet, and its gate failed"
    third = reg.register_model(session_id="s1", phase_name="b", model_name="again",
                               model_path=reg.get_model(second)["model_path"], parameter_count=122905)
    reg.set_model_status([third], "retired", reason=reason)
    models = registry_tables(reg, "s1")["models"]
    assert list(models.status)[2] == f"retired: {reason}" and list(models.parameters) == ["123", "123", "122,905"]


def test_model_details_write_the_metadata_as_readable_lines():
    """One ``key: value`` line per metadata entry, a nested mapping one line per entry below its key, deeper ones as
    ``key=value`` pairs, lists bracketed, the role left out (the first line names it), a long value cut."""
    from forgelib.viz.inspect import metadata_lines

    meta = {"role": "model", "bitnet": {"activation_bits": 8, "include": ["mlp.up_proj", "mlp.down_proj"]},
            "curriculum": {"level_reached": {"arith": 2, "tool": 1}}, "baking": "prompt-taught", "long": "x" * 200}
    assert metadata_lines(meta) == ["  bitnet:", "    activation_bits: 8", "    include: [mlp.up_proj, mlp.down_proj]",
                                    "  curriculum:", "    level_reached: arith=2, tool=1",
                                    "  baking: prompt-taught", f"  long: {'x' * 160}... (200 characters)"]
    assert metadata_lines(None) == [] and metadata_lines({"role": "trunk"}) == []
