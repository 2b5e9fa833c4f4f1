"""Every YAML the workbench reads is bounded: alias bombs, recursive aliases, deep nesting, huge texts and
python tags are refused in well under a second, with a message that names the source and stays short."""
import resource
import time

import pytest

from forgelib.params import YAML_MAX_NODES, YamlError, load_yaml, load_yaml_file, read_yaml


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes whose alias expansion holds width**levels strings (9**9 = 387 million)."""
    names = [f"l{i}" for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(['"lol"'] * width) + "]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    text = alias_bomb()
    assert len(text) < 520
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    before, start = _peak_mb(), time.perf_counter()
    with pytest.raises(YamlError, match=r"bomb\.yaml: the YAML document expands to more than") as info:
        read_yaml(path)
    assert time.perf_counter() - start < 1.0
    assert _peak_mb() - before < 50
    assert len(str(info.value)) < 400


def test_the_bound_counts_expanded_values_exactly():
    # the mapping, its 2 keys, the list, its n scalars and 2: n + 5 values; a second alias of the list adds n + 1 more
    n, bound = 40, 100
    ok = "a: &a [" + ",".join(["1"] * n) + "]\n"
    assert len(load_yaml(ok + "b: 2\n", "ok", max_nodes=n + 5)["a"]) == n
    with pytest.raises(YamlError, match="expands to more than 44 values"):
        load_yaml(ok + "b: 2\n", "ok", max_nodes=n + 4)
    assert load_yaml(ok + "b: *a\n", "twice", max_nodes=bound)["b"] == [1] * n
    with pytest.raises(YamlError, match="expands"):
        load_yaml(ok + "b: [*a, *a]\n", "thrice", max_nodes=bound)
    assert YAML_MAX_NODES >= 10 * 1000


@pytest.mark.parametrize("text, match", [
    ("a: &a [*a]\n", "refers to itself"),
    ("x: !!python/object/apply:os.system ['true']\n", r"refused: could not determine a constructor.*line 1"),
    ("a: [\n", "not valid YAML"),
    ("[" * 100 + "]" * 100, "expands to more than"),
])
def test_hostile_documents_are_refused_with_a_sentence(text, match):
    with pytest.raises(YamlError, match=match):
        load_yaml(text, "doc")


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(YamlError, match=r"big\.yaml: 2097152 bytes of YAML, more than"):
        load_yaml_file(path)


def test_plain_documents_load_as_before():
    assert load_yaml("a: 1\nb: {c: [1, 2.5, x]}\nd: &d {e: 1}\nf: *d\n", "doc") == {
        "a": 1, "b": {"c": [1, 2.5, "x"]}, "d": {"e": 1}, "f": {"e": 1}}
    assert load_yaml("", "empty") is None


def test_a_set_value_that_is_a_bomb_is_refused_by_forge():
    from forgelib.cli import _parse_set

    with pytest.raises(YamlError, match=r"^--set cognate.x: the YAML document expands"):  # forge: ..., status 2
        _parse_set(["cognate.x=" + alias_bomb().replace("\n", ", ").join("{}")])


def test_a_merge_recipe_bomb_is_a_merge_error(tmp_path):
    from forgelib.merge import MergeError
    from forgelib.merge.models import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("method: linear\nparameters:\n  weight: " + alias_bomb().replace("\n", ", ").join("{}") + "\n")
    start = time.perf_counter()
    with pytest.raises(MergeError, match=r"recipe file .*recipe\.yaml: the YAML document expands"):
        load_recipe(path)
    assert time.perf_counter() - start < 1.0
