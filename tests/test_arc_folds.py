"""Nested cross-validation folds on 223 made-up subjects spread like the paper's cohort."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest

from napari_meshchop.data import folds, manifest
from napari_meshchop.data.manifest import Manifest, Pair
from napari_meshchop.errors import InputError, MeshchopError

EDGES = folds.BIN_EDGES


def cohort(n_2x=115, n_no_accel=108, seed=0) -> list[folds.Sample]:
    """The paper's bins are the quartiles of its cohort: a quarter of subjects in each,
    both acquisitions in every bin, and a few sizes right on the edges."""
    rng = np.random.default_rng(seed)
    acquisitions = ["space_2x"] * n_2x + ["space_no_accel"] * n_no_accel
    rng.shuffle(acquisitions)
    samples = []
    for i, acq in enumerate(acquisitions):
        b = i % 4
        size = int(rng.integers(EDGES[b] + 1, EDGES[b + 1] + 1))
        samples.append(folds.Sample(f"sub-M{2000 + i}_ses-{i * 7}", f"sub-M{2000 + i}", acq,
                                    size))
    samples[0] = folds.Sample(samples[0].id, samples[0].subject, "space_2x", EDGES[0] + 1)
    samples[1] = folds.Sample(samples[1].id, samples[1].subject, "space_2x", EDGES[-1])
    return samples


@pytest.fixture(scope="module")
def paper_folds():
    samples = cohort()
    return samples, folds.nested_folds(samples)


def test_every_subject_is_in_exactly_one_outer_test_fold(paper_folds):
    samples, made = paper_folds
    assert made.outer_folds == 3 and made.inner_folds == 3 and made.seed == 42
    tests = [sid for fold in made.outer for sid in fold.test]
    assert sorted(tests) == sorted(s.id for s in samples)  # each exactly once
    for fold in made.outer:
        assert not set(fold.train) & set(fold.test)
        assert sorted(fold.train + fold.test) == sorted(s.id for s in samples)
        assert 74 <= len(fold.test) <= 75


def test_inner_folds_partition_each_outer_training_set(paper_folds):
    _, made = paper_folds
    for fold in made.outer:
        vals = [sid for inner in fold.inner for sid in inner.val]
        assert sorted(vals) == sorted(fold.train)
        for inner in fold.inner:
            assert sorted(inner.train + inner.val) == sorted(fold.train)
            assert not set(inner.train) & set(inner.val)
            assert not set(inner.train + inner.val) & set(fold.test)


def test_stratification_by_size_bin_and_acquisition_holds(paper_folds):
    samples, made = paper_folds
    stratum = {s.id: s.stratum for s in samples}
    totals = Counter(stratum.values())
    assert len(totals) == 8 and min(totals.values()) >= 15 and not made.merges
    for fold in made.outer:
        counts = Counter(stratum[sid] for sid in fold.test)
        for key, n in totals.items():
            assert abs(counts[key] - n / 3) <= 1, (key, counts[key], n)
        for inner in fold.inner:
            inner_counts = Counter(stratum[sid] for sid in inner.val)
            train_counts = Counter(stratum[sid] for sid in fold.train)
            for key, n in train_counts.items():
                assert abs(inner_counts[key] - n / 3) <= 1


def test_folds_are_deterministic_for_a_seed(paper_folds):
    samples, made = paper_folds
    shuffled = list(reversed(samples))
    assert folds.nested_folds(shuffled).to_dict() == made.to_dict()  # input order is moot
    assert folds.nested_folds(samples, seed=7).outer[0].test != made.outer[0].test


def test_size_bins_put_sizes_outside_into_the_end_bins():
    assert [folds.size_bin(v) for v in (1, 203, 204, 33619)] == [0, 0, 0, 0]
    assert [folds.size_bin(v) for v in (33620, 67891, 67892, 128314)] == [1, 1, 2, 2]
    assert [folds.size_bin(v) for v in (128315, 363885, 10**7)] == [3, 3, 3]
    assert folds.bin_label(1) == "(33619, 67891]"


def test_strata_too_small_are_merged_and_reported_not_crashed():
    samples = cohort()
    # one huge TSE-like oddity and two tiny SPACE lesions: strata of 1 and 2 subjects
    extra = [folds.Sample("sub-X1_ses-1", "sub-X1", "other", 500_000),
             folds.Sample("sub-X2_ses-1", "sub-X2", "space_no_accel", 50),
             folds.Sample("sub-X3_ses-1", "sub-X3", "space_no_accel", 60)]
    odd = [s for s in samples if s.stratum != ("space_no_accel", 0)] + extra
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even sklearn's "least populated class" warning
        made = folds.nested_folds(odd)
    outer = [m for m in made.merges if m.level == "outer"]
    assert {m.stratum for m in outer} == {"other (128314, 363885]",
                                          "space_no_accel (203, 33619]"}
    by_stratum = {m.stratum: m for m in outer}
    assert by_stratum["other (128314, 363885]"].into.endswith(" (128314, 363885]")
    assert by_stratum["space_no_accel (203, 33619]"].into == "space_no_accel (33619, 67891]"
    assert "merged into" in "\n".join(made.summary())
    assert sorted(sid for f in made.outer for sid in f.test) == sorted(s.id for s in odd)


def test_a_handful_of_subjects_all_in_different_strata_still_split():
    few = [folds.Sample(f"s{i}_ses-1", f"s{i}", acq, size) for i, (acq, size) in enumerate(
        [("space_2x", 300), ("space_2x", 40_000), ("space_no_accel", 70_000),
         ("space_no_accel", 200_000), ("space_2x", 100_000), ("space_no_accel", 1000)])]
    made = folds.nested_folds(few, outer=2, inner=2)
    assert sorted(sid for f in made.outer for sid in f.test) == sorted(s.id for s in few)
    assert made.merges
    with pytest.raises(MeshchopError, match="cannot be split into 3 folds"):
        folds.nested_folds(few[:2])
    with pytest.raises(MeshchopError, match="at least 2"):
        folds.nested_folds(few, inner=1)


def test_sessions_of_one_subject_stay_together():
    samples = cohort()
    s = samples[10]
    twin = folds.Sample(f"{s.subject}_ses-99999", s.subject, s.acquisition, s.lesion_voxels)
    made = folds.nested_folds([*samples, twin])
    (fold,) = [f for f in made.outer if s.id in f.test]
    assert twin.id in fold.test
    for f in made.outer:
        for inner in f.inner:
            assert (s.id in inner.val) == (twin.id in inner.val)


def _manifest_of(samples) -> Manifest:
    pairs = [Pair(s.subject, s.id.split("_")[1], s.acquisition, "1", "i.nii.gz", "m.nii.gz",
                  "0" * 64, "0" * 64, 1, 1, (2, 2, 2), (1.0, 1.0, 1.0), "RAS",
                  s.lesion_voxels, s.lesion_voxels / 1000) for s in samples]
    return Manifest(repo="test", pairs=pairs)


def test_folds_json_next_to_the_manifest(tmp_path):
    samples = cohort()
    m = _manifest_of(samples)
    m.save(tmp_path)
    made = folds.make(tmp_path)
    saved = json.loads((tmp_path / folds.NAME).read_text())
    assert saved["format"] == folds.FORMAT and saved["bin_edges"] == list(EDGES)
    assert saved["seed"] == 42 and saved["split_by"] == "subject"
    assert folds.load(tmp_path).to_dict() == made.to_dict()
    # the download keeps folds made for this very cohort (here: seed 7) ...
    folds.make(tmp_path, seed=7)
    folds.ensure(tmp_path, manifest.load(tmp_path))
    assert folds.load(tmp_path).seed == 7
    # ... and replaces folds of another cohort with the default ones
    _manifest_of(samples[:-1]).save(tmp_path)
    folds.ensure(tmp_path, manifest.load(tmp_path))
    assert folds.load(tmp_path).seed == 42
    assert len([i for f in folds.load(tmp_path).outer for i in f.test]) == 222


@pytest.mark.parametrize("module, name, what", [(folds, "folds.json", "folds file"),
                                                (manifest, "manifest.json", "ARC manifest")])
def test_our_json_files_fail_clearly(tmp_path, module, name, what):
    with pytest.raises(InputError, match="no .* here; run `meshchop"):
        module.load(tmp_path)
    (tmp_path / name).write_text("{not json")
    with pytest.raises(InputError, match=f"not a readable {what}") as err:
        module.load(tmp_path)
    assert name in str(err.value)
    (tmp_path / name).write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match=f"not a napari-meshchop {what}"):
        module.load(tmp_path / name)
