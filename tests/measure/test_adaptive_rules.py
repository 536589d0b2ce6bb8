"""The adaptive sweep's rules (measure/adaptive.py) on planted groups: each rule fires exactly when its
evidence is missing, with its reason, and a group with every piece of evidence is done."""

import math

import numpy as np
import pytest

from measure.adaptive import Tolerances, assess

BITS = 192.0  # bits per sequence (S=32, V=64)
CAPACITY = 12_000.0  # the planted capacity: 62.5 sequences' worth (near H(X) up to 62.5 / 0.95 = 65.8)
DONE = [16, 48, 66, 90]  # sizes that establish everything at this capacity


def planted(sizes, seeds=(0,), capacity=CAPACITY, converged=True, noise=None):
    """(sizes, seeds, mem_bits, converged, entropy) of cells measuring min(capacity, H(X)) exactly,
    or with `noise[seed]` (relative) added."""
    rows = [(n, s) for n in sizes for s in seeds]
    n = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows])
    entropy = n * BITS
    mem = np.minimum(capacity, entropy) * (1 + np.array([(noise or {}).get(seed, 0.0) for seed in s]))
    return n, s, mem, np.full(n.size, converged), entropy


def sizes_added(verdict):
    return sorted({a.num_sequences for a in verdict.additions})


def test_a_group_with_every_piece_of_evidence_is_done():
    # 48 holds its whole dataset, 66 (mem_fraction 0.947) is within sqrt(2) of it, 66 and 90 both sit on
    # the plateau
    verdict = assess(*planted(DONE))
    assert verdict.done and verdict.additions == ()
    assert verdict.plateau_established and verdict.knee == (48, 66)
    assert verdict.capacity_bits == CAPACITY and not verdict.lower_bound


def test_smallest_size_not_near_entropy_adds_a_smaller_one():
    verdict = assess(*planted([64, 128, 256]))  # 64 holds 12,000 of its 12,288 bits: 0.977, near
    assert 32 not in sizes_added(verdict)
    verdict = assess(*planted([80, 160, 320]))  # 80: 12,000 of 15,360 bits, 0.78
    assert 40 in sizes_added(verdict)
    (reason,) = {a.reason for a in verdict.additions if a.num_sequences == 40}
    assert reason == "smallest size 80 at mem_fraction 0.78 < 0.95: add 40"


def test_plateau_needs_two_sizes_past_capacity():
    verdict = assess(*planted([16, 48, 64]))  # only 64 holds more than the capacity
    assert sizes_added(verdict) == [128]
    assert not verdict.plateau_established
    assert verdict.additions[0].reason == ("plateau not established: 1 size(s) hold more information than the "
                                           "capacity, 2 needed: add 128")


def test_plateau_still_growing_adds_a_larger_size():
    n, s, mem, done, entropy = planted([*DONE, 128])
    mem[n == 128] = CAPACITY * 1.08  # still growing by 8% between the two largest sizes
    verdict = assess(n, s, mem, done, entropy)
    assert sizes_added(verdict) == [256]
    assert "differ by 8.0% > 5.0%: add 256" in verdict.additions[0].reason
    # a looser tolerance accepts the same plateau
    assert assess(n, s, mem, done, entropy, Tolerances(plateau_tol=0.1)).done


def test_falling_unconverged_largest_stops_as_a_lower_bound():
    n, s, mem, done, entropy = planted([*DONE, 128], converged=False)
    mem[n == 128] = CAPACITY * 0.8  # under-trained at the step cap: falls 20% past the capacity
    verdict = assess(n, s, mem, done, entropy)
    assert 256 not in sizes_added(verdict) and verdict.done
    assert verdict.lower_bound and not verdict.plateau_established
    assert any("falls 20.0% from N=90 to N=128" in note and "lower bound" in note for note in verdict.notes)


def test_falling_converged_largest_still_adds_a_larger_size():
    n, s, mem, done, entropy = planted([*DONE, 128])
    mem[n == 128] = CAPACITY * 0.8
    assert sizes_added(assess(n, s, mem, done, entropy)) == [256]


def test_knee_wider_than_sqrt2_adds_the_size_between():
    verdict = assess(*planted([16, 128, 256]))  # knee between 16 (whole dataset) and 128
    assert sizes_added(verdict) == [45]
    assert verdict.knee is None
    assert verdict.additions[0].reason == "knee between 16 and 128 (ratio 8.00 > 1.41): add 45"


def test_knee_within_sqrt2_up_to_a_whole_sequence_is_placed():
    # 64 * sqrt(2) = 90.5: 91 is the first whole size past it, so 64 -> 91 is placed, 64 -> 92 is not
    capacity = 91 * BITS * 0.9  # 64 holds its dataset, 91 and 92 sit past the capacity
    assert assess(*planted([16, 64, 91, 182], capacity=capacity)).knee == (64, 91)
    verdict = assess(*planted([16, 64, 92, 184], capacity=capacity))
    assert sizes_added(verdict) == [round(math.sqrt(64 * 92))]


def test_seed_spread_adds_the_next_seed_up_to_max_seeds():
    noise = {0: 0.06, 1: -0.06}  # seeds 6% above and below: a spread (std / mean) of 8.5% at every size
    verdict = assess(*planted(DONE, seeds=(0, 1), noise=noise))
    assert {(a.num_sequences, a.seed) for a in verdict.additions} == {(n, 2) for n in DONE}
    assert all(a.reason == f"seed spread 8.5% > 5.0% at {a.num_sequences}: add seed 2" for a in verdict.additions)
    capped = assess(*planted(DONE, seeds=(0, 1), noise=noise), Tolerances(max_seeds=2))
    assert capped.done and any("max_seeds=2" in note for note in capped.notes)


def test_new_sizes_take_the_seeds_every_size_has_and_nothing_measured_returns():
    n, s, mem, done, entropy = planted([16, 128, 256], seeds=(0, 1))
    keep = ~((n == 256) & (s == 1))  # 256 has seed 0 only
    verdict = assess(n[keep], s[keep], mem[keep], done[keep], entropy[keep])
    assert {(a.num_sequences, a.seed) for a in verdict.additions} == {(45, 0)}


def test_unconverged_plateau_cells_make_a_lower_bound_with_the_reason():
    verdict = assess(*planted(DONE, converged=False))
    assert verdict.done and verdict.plateau_established and verdict.lower_bound
    assert verdict.notes == ("unconverged cells (annealed mem_bits still moving at their last horizon) hold more "
                             "information than the capacity at N=[66, 90]",)


def test_the_rules_are_deterministic():
    args = planted([80, 160, 320], seeds=(0, 1), noise={0: 0.1, 1: -0.1})
    assert assess(*args) == assess(*args)


@pytest.mark.parametrize("field, value", [("plateau_tol", 0.0), ("seed_tol", 1.5), ("max_seeds", 0),
                                          ("knee_factor", 1.0), ("near_entropy", 0.0), ("size_factor", 1.0)])
def test_bad_tolerances_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}={value!r} must"):
        Tolerances(**{field: value})


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        assess([16, 32], [0], [1.0, 2.0], [True, True], [1.0, 2.0])
