"""`forge merge` against hostile input: it writes only into a new or empty folder outside the outputs root (a file,
a session's folder or a source is refused before anything loads), checks that the weights were written, never
overwrites a mergekit file unasked, hashes only the recipe's own model folders, and names a source it cannot load
or a recipe it refuses in one `forge: ...` line with exit status 2."""
import pickle
import re
import time
from pathlib import Path

import pytest

from forgelib import cli
from forgelib.checksums import compute_checksum
from forgelib.merge import MergeError, MergeRecipe, save_recipe
from forgelib.merge.targets import check_weights_written
from helpers import perturbed_copy


def _forge(*args) -> int:
    return cli.main(["merge", *map(str, args)])


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """An outputs root of this test's own, away from the sources and --out folders the tests use."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("FORGE_OUTPUTS", str(root))
    return root


@pytest.fixture
def sources(tmp_path, tiny_llama, outputs):
    """A trunk and two children saved as model folders, and a recipe over them holding their checksums."""
    folders = {"trunk": tmp_path / "trunk", "a": tmp_path / "a", "b": tmp_path / "b"}
    tiny_llama.save_pretrained(folders["trunk"])
    perturbed_copy(tiny_llama, 1).save_pretrained(folders["a"])
    perturbed_copy(tiny_llama, 2).save_pretrained(folders["b"])
    names = {k: str(v) for k, v in folders.items()}
    recipe = MergeRecipe("task_arithmetic", [names["a"], names["b"]], names["trunk"], parameters={"weights": 0.5},
                         checksums={v: compute_checksum(v) for v in names.values()})
    return folders, save_recipe(recipe, tmp_path / "recipe.yaml")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything is hashed or loaded: a refusal must come first."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("hashed or loaded before the refusal")

    monkeypatch.setattr("forgelib.checksums.compute_checksum", forbidden)
    monkeypatch.setattr(cli, "_load_source", forbidden)


def _err(capsys) -> str:
    captured = capsys.readouterr()
    assert "written to" not in captured.out
    assert "Traceback" not in captured.err
    return captured.err.strip()


# ---------------------------------------------------------------- --out


def test_a_non_empty_out_folder_is_refused_unless_forced(sources, tmp_path, capsys, no_work):
    _, recipe = sources
    out = tmp_path / "sharded"
    out.mkdir()
    shard = out / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"someone else's shard")
    assert _forge(recipe, "--out", out) == 2
    assert _err(capsys) == (f"forge: --out {out} is not empty; give a new or empty folder, or --force to write into "
                            "it (the model files it holds are replaced)")
    assert shard.read_bytes() == b"someone else's shard"


def test_force_writes_into_a_non_empty_folder(sources, tmp_path, capsys):
    _, recipe = sources
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    assert _forge(recipe, "--out", out, "--force") == 0
    assert f"rebuilt model written to {out}" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_size > 0 and (out / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_out_folder_under_the_outputs_root_is_refused_even_with_force(sources, outputs, tmp_path, capsys,
                                                                         no_work, force):
    _, recipe = sources
    speed = outputs / "s" / "01_cognate" / "models" / "speed"
    speed.mkdir(parents=True)
    (speed / "model.safetensors").write_bytes(b"registered")
    link = tmp_path / "innocent"
    link.symlink_to(outputs / "s")  # a way in from outside resolves to the same place
    for out, shown in ((speed, speed), (outputs / "new", outputs / "new"), (link / "fresh", outputs / "s" / "fresh")):
        assert _forge(recipe, "--out", out, *force) == 2
        assert _err(capsys) == (f"forge: --out {shown} lies under the outputs root {outputs}, whose folders belong "
                                "to sessions and the registry; give --out a path outside it")
    assert (speed / "model.safetensors").read_bytes() == b"registered"
    assert not (outputs / "new").exists() and not (outputs / "s" / "fresh").exists()


def test_the_default_out_next_to_a_recipe_under_the_outputs_root_is_refused(sources, outputs, capsys, no_work):
    _, recipe = sources
    inside = outputs / "s" / "02_evomerge" / "recipe.yaml"
    inside.parent.mkdir(parents=True)
    inside.write_text(recipe.read_text())
    assert _forge(inside) == 2
    assert _err(capsys) == (f"forge: the default output folder (rebuilt/ next to the recipe) {inside.parent}/rebuilt "
                            f"lies under the outputs root {outputs}, whose folders belong to sessions and the "
                            "registry; give --out a path outside it")
    assert not (inside.parent / "rebuilt").exists()


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_out_that_is_a_file_or_under_a_file_is_refused(sources, tmp_path, capsys, no_work, force):
    _, recipe = sources
    taken = tmp_path / "taken.bin"
    taken.write_bytes(b"data")
    assert _forge(recipe, "--out", taken, *force) == 2
    assert _err(capsys) == f"forge: --out {taken} is an existing file; give a folder"
    assert _forge(recipe, "--out", taken / "sub", *force) == 2
    assert _err(capsys) == f"forge: --out {taken / 'sub'} cannot be created: {taken} is a file, not a folder"
    assert taken.read_bytes() == b"data"


def test_an_out_overlapping_a_source_is_refused_even_with_force(sources, capsys, no_work):
    folders, recipe = sources
    before = {p.name: p.read_bytes() for p in folders["a"].iterdir()}
    for out, source in ((folders["a"], folders["a"]), (folders["a"] / "inner", folders["a"]),
                        (folders["a"].parent, folders["trunk"])):
        assert _forge(recipe, "--out", out, "--force") == 2
        assert _err(capsys) == (f"forge: --out {out} overlaps the merge source {source}; give a folder outside the "
                                "sources")
    assert {p.name: p.read_bytes() for p in folders["a"].iterdir()} == before


def test_a_save_that_writes_no_weights_fails_instead_of_reporting_success(sources, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    _, recipe = sources
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, folder, **kw: Path(folder).mkdir())
    out = tmp_path / "out"
    assert _forge(recipe, "--out", out) == 1
    assert _err(capsys) == (f"forge: no weights were written to {out} (no model.safetensors after saving); the "
                            "merged model was not saved")


def test_a_sharded_save_with_a_missing_shard_is_not_a_saved_model(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(MergeError, match=r"lacks weight shard\(s\) its index names "
                                         r"\(\['model-00002-of-00002.safetensors'\]\); it was not saved"):
        check_weights_written(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"y")
    check_weights_written(tmp_path)


# ---------------------------------------------------------------- --to-mergekit


def test_to_mergekit_overwrites_an_existing_file_only_with_force(sources, tmp_path, capsys):
    _, recipe = sources
    target = tmp_path / "mk.yaml"
    target.write_text("mine\n")
    assert _forge(recipe, "--to-mergekit", target) == 2
    assert _err(capsys) == (f"forge: --to-mergekit {target} already exists; give a new file name, or --force to "
                            "overwrite it")
    assert target.read_text() == "mine\n"
    assert _forge(recipe, "--to-mergekit", target, "--force") == 0
    assert "merge_method: task_arithmetic" in target.read_text()


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_to_mergekit_never_writes_over_the_recipe_a_folder_or_the_outputs_root(sources, outputs, capsys, force):
    _, recipe = sources
    text = recipe.read_text()
    assert _forge(recipe, "--to-mergekit", recipe, *force) == 2
    assert _err(capsys) == f"forge: --to-mergekit {recipe} is the recipe itself; give another file name"
    assert _forge(recipe, "--to-mergekit", recipe.parent, *force) == 2
    assert _err(capsys) == f"forge: --to-mergekit {recipe.parent} is a folder; give a file name"
    inside = outputs / "s" / "01_cognate" / "models" / "speed" / "config.json"
    assert _forge(recipe, "--to-mergekit", inside, *force) == 2
    assert _err(capsys) == (f"forge: --to-mergekit {inside} lies under the outputs root {outputs}, whose folders "
                            "belong to sessions and the registry; give --to-mergekit a path outside it")
    assert recipe.read_text() == text and not outputs.exists()


# ---------------------------------------------------------------- checksums


def _recipe_with(tmp_path, base: str, models: list[str], checksums: dict) -> Path:
    return save_recipe(MergeRecipe("task_arithmetic", models, base, parameters={"weights": 0.5},
                                   checksums=checksums), tmp_path / "hostile.yaml")


@pytest.mark.skipif(not Path("/usr/lib").is_dir(), reason="needs a large system folder")
def test_a_system_folder_named_as_a_checked_source_is_refused_before_hashing(sources, tmp_path, capsys, no_work):
    folders, _ = sources
    recipe = _recipe_with(tmp_path, "/usr", [str(folders["a"])], {"/usr": "0" * 64})
    start = time.perf_counter()
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    assert time.perf_counter() - start < 1.0
    assert _err(capsys) == ("forge: source model '/usr' of the recipe at /usr is not a model folder (a folder "
                            "holding config.json); refusing to hash it")
    assert not (tmp_path / "out").exists()


def test_checksum_entries_must_name_the_recipes_sources_and_hold_digests(sources, tmp_path, capsys, no_work):
    folders, _ = sources
    base, a = str(folders["trunk"]), str(folders["a"])
    recipe = _recipe_with(tmp_path, base, [a], {base: "0" * 64, "/usr": "0" * 64})
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    assert _err(capsys) == (f"forge: recipe checksum entry '/usr' names no source of the recipe; entries may name "
                            f"only its base and models: {[base, a]!r}")
    recipe = _recipe_with(tmp_path, base, [a], {a: ["x" * 1000]})
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    err = _err(capsys)
    assert err.startswith(f"forge: recipe checksum of {a!r} must be a SHA-256 hex digest (64 characters 0-9a-f), "
                          "got ['xxx")
    assert len(err) < 400


def test_a_checked_source_that_is_a_file_or_a_huge_tree_is_refused_before_hashing(sources, tmp_path, capsys,
                                                                                   no_work, monkeypatch):
    folders, _ = sources
    base = str(folders["trunk"])
    weights = folders["a"] / "model.safetensors"
    recipe = _recipe_with(tmp_path, base, [str(weights)], {str(weights): "0" * 64})
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    assert _err(capsys) == (f"forge: source model {str(weights)!r} of the recipe at {weights} is not a model folder "
                            "(a folder holding config.json); refusing to hash it")
    monkeypatch.setattr("forgelib.merge.models.MAX_SOURCE_ENTRIES", 8)
    tree = folders["b"] / "deep" / "er"
    tree.mkdir(parents=True)
    for i in range(8):
        (tree / f"f{i}").write_text("x")
    recipe = _recipe_with(tmp_path, base, [str(folders["b"])], {str(folders["b"]): "0" * 64})
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    assert _err(capsys) == (f"forge: source model {str(folders['b'])!r} of the recipe at {folders['b']} holds more "
                            "than 8 files and folders, too many for a model folder; refusing to hash it")


def test_a_changed_source_is_still_refused(sources, tmp_path, capsys):
    folders, recipe = sources
    (folders["b"] / "config.json").write_text((folders["b"] / "config.json").read_text() + " ")
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    assert f"forge: source model '{folders['b']}' at {folders['b']} was changed since the recipe" in _err(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- sources that cannot be loaded


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


class _Payload:
    """Unpickling it would create the file ``marker`` (what a hostile pickle's code could do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(folder.parent / "pwned")}))


@pytest.mark.parametrize("damage,kind", [(_truncate, "ModelLoadError: .*truncated"),
                                         (_pickle, "ModelLoadError: .*is a pickle checkpoint, never loaded")])
@pytest.mark.parametrize("checked", [True, False])
def test_a_source_that_cannot_load_is_named(sources, tmp_path, capsys, damage, kind, checked):
    folders, _ = sources
    damage(folders["b"])
    names = [str(folders["a"]), str(folders["b"])]
    sums = {n: compute_checksum(n) for n in [str(folders["trunk"]), *names]} if checked else {}
    recipe = _recipe_with(tmp_path, str(folders["trunk"]), names, sums)
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    err = _err(capsys).splitlines()[-1]  # the lines above: the unchecked-sources warning, torch's pickle warning
    assert re.match(f"forge: cannot load merge source {re.escape(str(folders['b']))}: {kind}", err), err
    assert len(err) < 400 and not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_a_mergekit_source_that_cannot_load_is_named(sources, tmp_path, capsys):
    folders, _ = sources
    _truncate(folders["a"])
    config = tmp_path / "mk.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {folders['trunk']}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {folders['a']}\n    parameters: {{weight: 1}}\n")
    assert _forge(config, "--out", tmp_path / "out") == 2
    assert _err(capsys).startswith(f"forge: cannot load merge source {folders['a']}: ModelLoadError: ")


# ---------------------------------------------------------------- the recipe itself


def test_an_alias_bomb_in_a_recipe_is_one_line_and_exit_2(tmp_path, capsys, outputs, no_work):
    levels = [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"lol"'] * 9) + "]" for i in range(9)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: linear\nmodels: [a]\nparameters:\n  weight: {" + ", ".join(levels) + "}\n")
    start = time.perf_counter()
    assert _forge(recipe, "--out", tmp_path / "out") == 2
    assert time.perf_counter() - start < 1.0
    err = _err(capsys)
    assert err.startswith(f"forge: recipe file {recipe}: the YAML document expands to more than ") and "\n" not in err
