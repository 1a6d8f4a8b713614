"""Patient splits: disjoint, folds partition the patients, stratified, deterministic."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from seg_densenet.data.acdc import GROUPS
from seg_densenet.data.splits import load_split, make_split, save_split, split_patients
from seg_densenet.errors import ConfigError, DataError

PATIENTS = [(f"patient{i:03d}", GROUPS[i % 5]) for i in range(1, 101)]  # ACDC: 20 per group


@pytest.mark.parametrize("n_folds", [2, 5, 7])
def test_sets_disjoint_and_folds_partition(n_folds):
    names = {n for n, _ in PATIENTS}
    tests = []
    for fold in range(n_folds):
        split = make_split(PATIENTS, fold=fold, n_folds=n_folds, val_fraction=0.2, seed=3)
        train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == names
        assert len(val) == int((len(names) - len(test)) * 0.2)
        tests.append(test)
    assert set().union(*tests) == names and sum(len(t) for t in tests) == len(names)
    assert max(map(len, tests)) - min(map(len, tests)) <= 1


def test_stratified_by_group():
    groups = dict(PATIENTS)
    for fold in range(5):
        split = make_split(PATIENTS, fold=fold, n_folds=5, val_fraction=0.2, seed=0)
        assert Counter(groups[n] for n in split["test"]) == dict.fromkeys(GROUPS, 4)
        val = Counter(groups[n] for n in split["val"])  # 0.2 of 16 per group = 3.2: 3 or 4, 16 in all
        assert set(val) == set(GROUPS) and set(val.values()) <= {3, 4} and sum(val.values()) == 16
        train = Counter(groups[n] for n in split["train"])
        assert all(train[g] + val[g] == 16 for g in GROUPS)


def test_unbalanced_and_unknown_groups_spread_over_folds():
    patients = [(f"p{i:02d}", "DCM" if i < 13 else None) for i in range(30)]
    for fold in range(5):
        test = make_split(patients, fold=fold, n_folds=5, seed=1)["test"]
        n_dcm = sum(int(name[1:]) < 13 for name in test)
        assert n_dcm in (2, 3) and len(test) == 6


def test_deterministic_and_seed_dependent():
    a = make_split(PATIENTS, fold=1, seed=7)
    assert make_split(list(reversed(PATIENTS)), fold=1, seed=7) == a  # input order does not matter
    assert make_split(PATIENTS, fold=1, seed=8)["test"] != a["test"]


def test_save_and_load(tmp_path):
    split = make_split(PATIENTS, fold=2, n_folds=5, seed=4)
    path = save_split(tmp_path / "sub" / "split.json", split)
    data = json.loads(path.read_text())
    assert {"seed", "fold", "n_folds", "train", "val", "test"} <= set(data)
    assert (data["seed"], data["fold"], data["n_folds"]) == (4, 2, 5)
    assert load_split(path) == split


def test_fold_all_holds_no_patient_out(tmp_path):
    split = make_split(PATIENTS, fold="all", n_folds=5, val_fraction=0.2, seed=0)
    assert split["test"] == [] and split["fold"] == "all"
    assert sorted(split["train"] + split["val"]) == sorted(name for name, _ in PATIENTS)
    assert len(split["val"]) == 20  # the validation fraction is of every patient
    trained = make_split(PATIENTS, fold="all", val_fraction=0)["train"]
    assert trained == sorted(name for name, _ in PATIENTS)
    path = save_split(tmp_path / "split.json", split)
    with pytest.raises(DataError, match=r"the test list is empty \(fold all: every patient trained\)"):
        split_patients(path, "test")


@pytest.mark.parametrize(
    "kwargs",
    [{"fold": 5}, {"fold": -1}, {"fold": "every"}, {"n_folds": 1}, {"n_folds": 101}, {"val_fraction": 1.0}],
)
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        make_split(PATIENTS, **kwargs)
