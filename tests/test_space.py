import pytest
import yaml

from sweep.space import SpaceError, load_space


def test_shipped_spaces_expand_to_the_papers_configurations():
    quick = load_space()  # the default
    assert quick.name == "quick" and [t.label() for t in quick.trials] == [
        "vae_L1_M1_K1_s0", "vae_L1_M1_K5_s0", "iwae_L1_M1_K5_s0"]
    assert quick.evaluation.images == 2000 and not any(t.comparable_to_papers for t in quick.trials)

    burda = load_space("burda2016")
    assert {(t.objective, t.k, t.layers) for t in burda.trials} == {
        (o, k, layers) for o in ("vae", "iwae") for k in (1, 5, 50) for layers in (1, 2)}
    assert all(t.passes == 3280 and t.comparable_to_papers for t in burda.trials)
    assert burda.evaluation.k == 5000 and burda.evaluation.images is None

    rainforth = load_space("rainforth2018")
    miwae = sorted((t.m, t.k) for t in rainforth.trials if t.objective == "miwae")
    assert miwae == [(1, 64), (4, 16), (8, 8), (16, 4), (64, 1)]
    assert sorted(t.beta for t in rainforth.trials if t.objective == "ciwae") == [0.05, 0.5]
    assert [(t.m, t.k) for t in rainforth.trials if t.objective == "piwae"] == [(8, 8)]
    assert [t.estimator for t in rainforth.trials if t.objective == "iwae"] == ["dreg"]


def write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


GOOD = {"experiments": [{"objective": "iwae", "k": [1, 5]}], "training": {"passes": 2}}


@pytest.mark.parametrize(("change", "expected"), [
    ({"experimnts": []}, ["experimnts", "unknown key", "experiments"]),
    ({"experiments": [{"objective": "iwae", "kk": 5}]}, ["experiments[0].kk", "unknown key", "estimator"]),
    ({"evaluation": {"k": "many"}}, ["evaluation.k", "'many'", "int"]),
    ({"training": {"passes": "ten"}}, ["passes='ten'", "positive integer"]),
    ({"training": {"epochs": 3}}, ["training.epochs", "unknown key", "passes"]),
    ({"mk_product": 64, "experiments": [{"objective": "miwae", "mk": [[4, 16], [8, 4]]}]},
     ["experiments[0].mk", "[8, 4]", "M*K = 32", "64"]),
    ({"experiments": [{"objective": "iwae", "k": 5, "layers": 2, "estimator": "dreg"}]},
     ["experiments[0]", "dreg", "2"]),
    ({"experiments": [{"objective": "rws", "k": 5}]}, ["experiments[0]", "rws", "iwae"]),
    ({"seeds": "0"}, ["seeds", "list of integers"]),
    ({"resources": {"cpus_per_trial": 0}}, ["resources.cpus_per_trial", "> 0"]),
    ({"evaluation": {"best": "median"}}, ["evaluation.best", "median", "each, top"]),
])
def test_bad_files_name_the_file_key_value_and_fix(tmp_path, change, expected):
    path = write(tmp_path, yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(SpaceError) as error:
        load_space(path)
    message = str(error.value)
    assert message.startswith(str(path))
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_unknown_space_name_lists_the_shipped_ones():
    with pytest.raises(SpaceError, match="burda2016, quick, rainforth2018"):
        load_space("burda2017")


def test_invalid_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(write(tmp_path, "experiments: [objective: iwae"))
