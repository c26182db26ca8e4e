"""The corruption campaign, bounded for CI (issue 13; bench/integrity.py --full runs 10,000+ trials): cards of
seven presets as directories and zips, damaged in every way cachecard.testing.corruption knows, read by every
path. Damage and inner forgeries: never silently wrong, never a foreign exception. Forgeries that recompute
every unkeyed checksum: refused whenever the store key is held."""

from __future__ import annotations

import collections

import pytest

from cachecard.testing import corruption

SEED = 13
PER_KIND = 4


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return corruption.build_variants(tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def results(variants, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("trials")
    return [corruption.trial(i, SEED, variants, scratch) for i in range(PER_KIND * len(corruption.FAULTS))]


def test_every_fault_kind_ran(results):
    assert collections.Counter(r["kind"] for r in results) == {k: PER_KIND for k in corruption.FAULTS}


def test_no_damage_reads_back_silently_wrong_or_as_a_foreign_exception(results):
    bad = [r for r in results if r["class"] != "forgery" and r["outcome"] in ("silent_wrong", "foreign")]
    assert bad == []


def test_damage_is_detected(results):
    """Each kind of damage is refused at least once (most are always; an appended byte after a zip's end or two
    identical arrays swapped change nothing returned)."""
    detected = {r["kind"] for r in results if r["outcome"] == "detected"}
    assert detected >= {k for k, (klass, _) in corruption.FAULTS.items() if klass != "forgery"} - {"swap_arrays"}


def test_forgeries_are_refused_with_the_key_and_by_verify_where_the_bytes_changed(results):
    forged = [r for r in results if r["class"] == "forgery"]
    assert forged and all(r["keyed_outcome"] == "detected" for r in forged)
    assert all(r["paths"]["verify"] == "error" for r in forged if r["kind"] == "forge_collision")
    assert not any(r["outcome"] == "foreign" for r in forged)


def test_a_trial_replays_exactly(variants, results, tmp_path):
    again = corruption.trial(7, SEED, variants, tmp_path)
    assert again == results[7]
