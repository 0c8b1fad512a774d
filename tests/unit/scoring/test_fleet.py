"""Placement over a fleet: prefix affinity, bounded load, stickiness, failures and round robin."""
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from polar_xtuner.scoring.fleet import ReplicaSet, group_key, rendezvous_order

REPLICAS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def rollouts(n_groups, n_rollouts, seed=0):
    """Keys of RL rollouts in a shuffled order (as an async RL framework finishes them)."""
    keys = [group_key(f"prompt {g}", [{"role": "assistant", "content": f"ref {g}"}])
            for g in range(n_groups) for _ in range(n_rollouts)]
    random.Random(seed).shuffle(keys)
    return keys


def test_group_keys_are_stable_and_tell_prompts_and_references_apart():
    msgs = [{"role": "user", "content": "2+2?"}]
    assert group_key(msgs, "4") == group_key([{"content": "2+2?", "role": "user"}], "4")  # key order is no matter
    assert len({group_key(msgs, "4"), group_key(msgs, "5"), group_key("2+2?", "4"), group_key(msgs, None)}) == 4
    # the same in another process with another hash seed: every client of a fleet agrees
    code = "from polar_xtuner.scoring.fleet import group_key; print(group_key('p', ['r', 1]))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.strip()
    assert other == group_key("p", ["r", 1])


def test_only_a_leaving_replicas_keys_move():
    keys = [group_key(f"p{i}", "r") for i in range(400)]
    before = {k: rendezvous_order(k, REPLICAS)[0] for k in keys}
    gone = REPLICAS[1]
    after = {k: rendezvous_order(k, [r for r in REPLICAS if r != gone])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)
    assert all(after[k] == rendezvous_order(k, REPLICAS)[1] for k in moved)  # each to its second choice
    assert 60 <= Counter(before.values())[gone] <= 140  # about a quarter each


def test_a_groups_rollouts_land_on_one_replica_in_any_order_and_load_stays_bounded():
    fleet = ReplicaSet(REPLICAS[:2])
    keys = rollouts(32, 8)
    where = fleet.assign(keys)
    by_key = {}
    for k, r in zip(keys, where):
        by_key.setdefault(k, set()).add(r)
    assert all(len(rs) == 1 for rs in by_key.values())
    load = Counter(where)
    assert max(load.values()) <= 1.25 * len(keys) / 2 + 8  # the bound, a group's size of rounding
    # the same groups again, in another order and in two rounds (verl's per-sample calls, gathered by time)
    again = rollouts(32, 8, seed=1)
    half = len(again) // 2
    where2 = fleet.assign(again[:half]) + fleet.assign(again[half:])
    assert all(by_key[k] == {r} for k, r in zip(again, where2))


def test_a_replica_that_falls_behind_takes_no_new_groups():
    fleet = ReplicaSet(REPLICAS[:2])
    slow = REPLICAS[0]
    fleet.begin(slow, 500)  # texts stuck in flight there
    where = fleet.assign(rollouts(16, 8))
    assert Counter(where)[slow] == 0
    fleet.end(slow, 500)
    assert Counter(fleet.assign(rollouts(16, 8, seed=3)[:0] + [group_key("new", i) for i in range(64)]))[slow] > 0


def test_a_failed_replica_is_left_out_then_used_again():
    clock = Clock()
    fleet = ReplicaSet(REPLICAS[:2], down_s=10, clock=clock)
    keys = [group_key(f"p{i}", "r") for i in range(40)]
    first = dict(zip(keys, fleet.assign(keys)))
    dead = REPLICAS[0]
    fleet.mark_failed(dead)
    assert fleet.live() == [REPLICAS[1]]
    assert set(fleet.assign(keys)) == {REPLICAS[1]}
    assert fleet.fallbacks(keys[0], REPLICAS[1]) == [REPLICAS[1]]
    clock.now = 11  # back: new keys reach it again; keys placed while it was out stay where they went
    fresh = [group_key(f"q{i}", "r") for i in range(40)]
    assert dead in fleet.assign(fresh)
    assert set(fleet.assign(keys)) == {REPLICAS[1]}
    # when every replica is out, all are tried rather than none
    fleet.mark_failed(REPLICAS[0])
    fleet.mark_failed(REPLICAS[1])
    assert fleet.live() == REPLICAS[:2]
    assert first  # (placed before any failure)


def test_membership_changes_and_round_robin():
    fleet = ReplicaSet(REPLICAS[:2])
    fleet.set_members(REPLICAS[:3])
    assert fleet.replicas == REPLICAS[:3]
    fleet.set_members([])  # a router with no healthy worker: keep the last known
    assert fleet.replicas == REPLICAS[:3]
    assert fleet.assign(["a"] * 7, routing="round_robin") == [REPLICAS[i % 3] for i in range(7)]
    assert fleet.assign(["a"] * 2, routing="round_robin") == [REPLICAS[1], REPLICAS[2]]  # carries on in turn
    with pytest.raises(ValueError, match="routing"):
        fleet.assign(["a"], routing="random")
    with pytest.raises(ValueError, match="at least one"):
        ReplicaSet([])
