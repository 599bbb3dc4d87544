import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iwae_model import TrainConfig
from sweep.space import SECTIONS, TOP_LEVEL, SpaceError, SweepSpace, load_space, training_keys, trial_keys


def test_shipped_spaces_expand_to_the_papers_configurations():
    quick = load_space()  # the default
    assert quick.name == "quick" and [t.label() for t in quick.trials] == [
        "vae_L1_M1_K1_s0",
        "vae_L1_M1_K5_s0",
        "iwae_L1_M1_K5_s0",
    ]
    assert quick.evaluation.images == 2000 and not any(t.comparable_to_papers for t in quick.trials)

    burda = load_space("burda2016")
    assert {(t.objective, t.k, t.layers) for t in burda.trials} == {
        (o, k, layers) for o in ("vae", "iwae") for k in (1, 5, 50) for layers in (1, 2)
    }
    assert all(t.passes == 3280 and t.comparable_to_papers for t in burda.trials)
    assert burda.evaluation.k == 5000 and burda.evaluation.images is None

    rainforth = load_space("rainforth2018")
    miwae = sorted((t.m, t.k) for t in rainforth.trials if t.objective == "miwae")
    assert miwae == [(1, 64), (4, 16), (8, 8), (16, 4), (64, 1)]
    assert sorted(t.beta for t in rainforth.trials if t.objective == "ciwae") == [0.05, 0.5]
    assert [(t.m, t.k) for t in rainforth.trials if t.objective == "piwae"] == [(8, 8)]
    assert [t.estimator for t in rainforth.trials if t.objective == "iwae"] == ["dreg"]
    assert all(t.snr_every == 10 for t in rainforth.trials)

    table2 = load_space("burda2016_table2")
    assert [t.label() for t in table2.trials] == ["vae_L1_M1_K1_s0", "iwae_L1_M1_K50_s0"]
    assert [t.label() for t in table2.continued] == [
        "iwae_L1_M1_K50_s0_from_vae_L1_M1_K1_s0",
        "vae_L1_M1_K1_s0_from_iwae_L1_M1_K50_s0",
    ]
    assert all(
        (t.passes, t.lr, t.schedule, t.init_optimizer) == (2187, 1e-4, "constant", False) for t in table2.continued
    )


def test_a_spec_written_before_fixed_and_init_label_alone_reads_as_its_trials():
    """Older sweeps' specs: a stage-2 trial's init_from held "stage 1: <parent>" until its parent's
    checkpoint was known, and binarized_mnist's binarization was "dynamic"."""
    table2 = load_space("burda2016_table2")
    assert all(t.init_from is None and t.init_label for t in table2.continued)
    old = table2.to_dict()
    old["continued"] = [{**t, "init_from": "stage 1: " + t["init_label"]} for t in old["continued"]]
    assert SweepSpace.from_dict(old).continued == table2.continued
    config = TrainConfig(dataset="binarized_mnist")
    assert (
        config.binarization == "fixed"
        and TrainConfig.from_dict({**config.to_dict(), "binarization": "dynamic"}) == config
    )


def write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


GOOD = {"experiments": [{"objective": "iwae", "k": [1, 5]}], "training": {"passes": 2}}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"experimnts": []}, ["experimnts", "unknown key", "experiments"]),
        ({"experiments": [{"objective": "iwae", "kk": 5}]}, ["experiments[0].kk", "unknown key", "estimator"]),
        ({"evaluation": {"k": "many"}}, ["evaluation.k", "'many'", "int"]),
        ({"training": {"passes": "ten"}}, ["passes='ten'", "positive integer"]),
        ({"training": {"epochs": 3}}, ["training.epochs", "unknown key", "passes"]),
        (
            {"mk_product": 64, "experiments": [{"objective": "miwae", "mk": [[4, 16], [8, 4]]}]},
            ["experiments[0].mk", "[8, 4]", "M*K = 32", "64"],
        ),
        (
            {"experiments": [{"objective": "iwae", "k": 5, "layers": 2, "estimator": "dreg"}]},
            ["experiments[0]", "dreg", "2"],
        ),
        ({"experiments": [{"objective": "sleep", "k": 5}]}, ["experiments[0]", "sleep", "iwae"]),
        ({"seeds": "0"}, ["seeds", "list of integers"]),
        ({"resources": {"cpus_per_trial": 0}}, ["resources.cpus_per_trial", "> 0"]),
        ({"evaluation": {"best": "median"}}, ["evaluation.best", "median", "each, top"]),
        ({"training": {"init_from": "/elsewhere"}}, ["training.init_from", "unknown key"]),
        (
            {"continue": {"switch": [{"from": {"objective": "vae"}, "to": {"k": 50}}]}},
            ["continue.switch[0].from", "{'objective': 'vae'} matches no first-stage trial", "iwae_L1_M1_K1_s0"],
        ),
        (
            {"continue": {"switch": [{"from": {"k": 1}, "to": {"objective": "sleep"}}]}},
            ["continue.switch[0]", "sleep", "iwae"],
        ),
        ({"continue": {"switch": [{"from": {"k": 1}, "to": {"kk": 5}}]}}, ["continue.switch[0].to.kk", "unknown key"]),
        (
            {"continue": {"training": {"init_optimizer": True}, "switch": []}},
            ["continue.training.init_optimizer", "unknown key"],
        ),
        ({"continue": {"to": {}}}, ["continue", "switch"]),
    ],
)
def test_bad_files_name_the_file_key_value_and_fix(tmp_path, change, expected):
    path = write(tmp_path, yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(SpaceError) as error:
        load_space(path)
    message = str(error.value)
    assert message.startswith(str(path))
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_unknown_space_name_lists_the_shipped_ones():
    with pytest.raises(
        SpaceError,
        match="burda2016, burda2016_fixed_binarization, burda2016_omniglot, burda2016_table2, "
        "ciwae_search, ciwae_search_quick, quick, rainforth2018",
    ):
        load_space("burda2017")


def test_invalid_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(write(tmp_path, "experiments: [objective: iwae"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- objective: iwae\n", ["expected a mapping of sections"]),
        ("just words\n", ["expected a mapping of sections"]),
        ("", ["expected a mapping of sections"]),
        (
            "experiments: [{objective: iwae, k: [1, 5]}]\nresources: {gpus_per_trial: .inf}\n",
            ["resources.gpus_per_trial", "finite"],
        ),
        ("experiments: [{objective: iwae, k: true}]\n", ["experiments[0]", "k=True", "positive integer"]),
        ("experiments: [{objective: iwae, k: []}]\n", ["experiments[0].k", "empty list"]),
        (
            "experiments: [{objective: iwae, latent_dims: [[50, 10]]}]\n",
            ["latent_dims", "one size per stochastic layer"],
        ),
        ("experiments: [{objective: iwae, lr: .nan}]\n", ["lr=nan", "finite"]),
        ("experiments: [{objective: iwae}]\ntraining: {binarization: 1}\n", ["binarization=1", "dynamic"]),
        ("experiments: [{objective: iwae}]\ntraining: 3\n", ["training", "expected a mapping"]),
        ("experiments: [{objective: iwae}]\nname: ..\n", ["name", "'..'", "folder name"]),
    ],
)
def test_wrong_types_anywhere_are_named(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as error:
        load_space(path)
    assert str(error.value).startswith(f"{path}: ")
    for fragment in expected:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_a_file_that_is_not_text_is_a_clear_error(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(SpaceError, match=f"{path}: cannot be read as UTF-8"):
        load_space(path)


# ---- generated documents: each loads, or raises SpaceError naming the file and the field ------

KEYS = sorted({*TOP_LEVEL, *training_keys(), *trial_keys(), "mk", *(k for schema in SECTIONS.values() for k in schema)})
EDGES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    5,
    64,
    10**30,
    math.inf,
    -math.inf,
    math.nan,
    0.0,
    0.5,
    1e300,
    "iwae",
    "vae",
    "miwae",
    "dreg",
    "stl",
    "dynamic",
    "each",
    "top",
    "x",
    "",
    [],
    [1],
    [0, 2],
    [[4, 16]],
    ["iwae"],
    [math.inf],
    {},
    {"k": 1},
]
scalars = st.sampled_from(EDGES) | st.integers() | st.floats() | st.text(max_size=4)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4) | st.integers(0, 3), inner, max_size=5)
    ),
    max_leaves=25,
)
# Mostly the real shape, each section with its own keys, so the checks deep inside are reached.
shaped = st.fixed_dictionaries(
    {
        "experiments": st.lists(
            st.dictionaries(
                st.sampled_from(sorted({*trial_keys(), "mk", *training_keys()})),
                scalars | st.lists(scalars, max_size=3),
                max_size=4,
            ),
            min_size=1,
            max_size=3,
        )
    },
    optional={
        **{key: documents for key in sorted(TOP_LEVEL - {"experiments", *SECTIONS})},
        **{
            section: st.dictionaries(st.sampled_from(sorted(schema)), scalars, max_size=3)
            for section, schema in SECTIONS.items()
        },
        "training": st.dictionaries(
            st.sampled_from(training_keys()), scalars | st.lists(scalars, max_size=3), max_size=4
        ),
    },
)


def assert_loads_or_names_the_file(path):
    try:
        load_space(path)
    except SpaceError as error:
        message = str(error)
        # "<file>: <field>: <problem>", or "<file>: <problem>" for the file as a whole
        assert message.startswith(f"{path}: ") and len(message) > len(str(path)) + 10, message


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=shaped | documents)
def test_generated_yaml_documents(tmp_path, document):
    assert_loads_or_names_the_file(write(tmp_path, yaml.safe_dump(document)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_generated_byte_strings(tmp_path, content):
    path = tmp_path / "space.yaml"
    path.write_bytes(content)
    assert_loads_or_names_the_file(path)


SLOTS = (
    [(section, key) for section, schema in SECTIONS.items() for key in schema]
    + [("training", key) for key in training_keys()]
    + [("experiments", key) for key in (*trial_keys(), "mk")]
    + [(key,) for key in ("name", "description", "seeds", "mk_product", "experiments", "training")]
)


def with_value(slot, value) -> dict:
    document = {**GOOD, "training": dict(GOOD["training"]), "experiments": [dict(GOOD["experiments"][0])]}
    if slot[0] == "experiments" and len(slot) == 2:
        document["experiments"][0][slot[1]] = value
    elif len(slot) == 2:
        document[slot[0]] = {**document.get(slot[0], {}), slot[1]: value}
    else:
        document[slot[0]] = value
    return document


@pytest.mark.parametrize("slot", SLOTS, ids=".".join)
def test_every_edge_value_in_every_slot_of_a_good_file(tmp_path, slot):
    # Exhaustive where random draws are thin: one slot of ~60 and one value of ~35 (inf in
    # resources.gpus_per_trial once crashed the loader).
    for value in EDGES:
        assert_loads_or_names_the_file(write(tmp_path, yaml.safe_dump(with_value(slot, value))))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slot=st.sampled_from(SLOTS), value=documents)
def test_generated_value_in_a_slot_of_a_good_file(tmp_path, slot, value):
    assert_loads_or_names_the_file(write(tmp_path, yaml.safe_dump(with_value(slot, value))))
