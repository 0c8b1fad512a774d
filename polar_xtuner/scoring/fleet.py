"""Which replica of a scoring fleet gets which text: prefix affinity with bounded load.

The n rollouts of one RL prompt share ``prompt + reference + <|reward|> +
prompt``, most of their tokens. A replica's prefix cache saves that work
only when the whole group reaches the same replica, so texts are routed by a
key of their prompt and reference (:func:`group_key`), not by request.

* **Rendezvous hashing** (highest random weight): every replica gets a weight
  ``hash(replica, key)`` and the key goes to the heaviest live one. Every
  client computes the same answer with no shared state, and when a replica
  leaves, only its own keys move (each to its next choice).
* **Bounded load** (consistent hashing with bounded loads): a replica takes
  no more than ``(1 + slack)`` times the mean load (texts in flight plus the
  round being placed). A key whose first choice is full goes to its next
  choice, and when every choice is full, to the least-loaded replica. So a
  replica that falls behind (its requests pile up) stops taking new groups,
  and a few large groups cannot load one replica with most of a round.
* **Sticky keys**: a key keeps its replica while that replica is live, so a
  group whose rollouts arrive in several rounds (verl's per-sample calls are
  gathered into rounds by time) stays on one replica whatever the order.

Membership (which replicas exist and are healthy) comes from outside: the
router's worker list, or the addresses given (see
:meth:`polar_xtuner.scoring.client.RemoteScorer`). A replica a request failed
on is left out for ``down_s`` seconds, or until the membership source reports
it healthy again after that.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Sequence

ROUTINGS = ("prefix", "round_robin")
# Placed load may exceed the mean by this fraction before a key moves on.
DEFAULT_SLACK = 0.1
# Seconds a replica that failed a request is left out.
DEFAULT_DOWN_S = 10.0
# Keys remembered with their replica (an RL step's prompts, many times over).
STICKY_KEYS = 1 << 16


def group_key(prompt, reference) -> str:
    """The routing key of a (prompt, reference): texts with equal keys share their prefix.

    Prompts and references may be strings or message lists; equal values give
    equal keys in every process (no Python ``hash`` randomisation).
    """
    blob = json.dumps([prompt, reference], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=12).hexdigest()


def _weight(replica: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica}\0{key}".encode("utf-8"), digest_size=8).digest(), "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """The replicas in ``key``'s order of preference (highest random weight first)."""
    return sorted(replicas, key=lambda r: _weight(r, key), reverse=True)


class ReplicaSet:
    """Live replicas and the assignment of keyed texts to them. Thread-safe.

    Args:
        replicas: Base URLs of the replicas.
        slack: Bounded-load slack (see the module docstring).
        down_s: Seconds a failed replica is left out.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(self, replicas: Sequence[str], slack: float = DEFAULT_SLACK, down_s: float = DEFAULT_DOWN_S,
                 clock=time.monotonic):
        if not replicas:
            raise ValueError("a fleet needs at least one replica")
        if slack < 0 or down_s < 0:
            raise ValueError("slack and down_s must be >= 0")
        self.slack, self.down_s, self.clock = slack, down_s, clock
        self._lock = threading.Lock()
        self._replicas = list(dict.fromkeys(replicas))
        self._down: dict[str, float] = {}  # replica -> when it may be tried again
        self._load: dict[str, int] = {}  # texts in flight
        self._sticky: OrderedDict[str, str] = OrderedDict()
        self._next = 0  # round robin's position

    # -- membership -------------------------------------------------------
    @property
    def replicas(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    def set_members(self, replicas: Sequence[str]) -> None:
        """Replace the replica list (a membership refresh): the healthy replicas, in any order.

        A replica that failed here stays out until its ``down_s`` passes, even
        when the membership source still lists it (health checks lag).
        """
        members = list(dict.fromkeys(replicas))
        if not members:
            return  # a router with no healthy worker: keep trying the last known ones
        with self._lock:
            self._replicas = members

    def mark_failed(self, replica: str) -> None:
        """Leave ``replica`` out for ``down_s`` seconds (a request on it failed)."""
        with self._lock:
            self._down[replica] = self.clock() + self.down_s

    def live(self) -> list[str]:
        """Replicas not left out; every replica when all are (something must be tried)."""
        with self._lock:
            return self._live()

    def _live(self) -> list[str]:
        now = self.clock()
        up = [r for r in self._replicas if self._down.get(r, 0.0) <= now]
        return up or list(self._replicas)

    # -- load -------------------------------------------------------------
    def begin(self, replica: str, n: int) -> None:
        with self._lock:
            self._load[replica] = self._load.get(replica, 0) + n

    def end(self, replica: str, n: int) -> None:
        with self._lock:
            self._load[replica] = max(0, self._load.get(replica, 0) - n)

    def load(self, replica: str) -> int:
        with self._lock:
            return self._load.get(replica, 0)

    # -- placement --------------------------------------------------------
    def assign(self, keys: Sequence[str], routing: str = "prefix") -> list[str]:
        """The replica of each text, from the texts' keys.

        ``"prefix"``: a key's texts all go to one replica (sticky, rendezvous,
        bounded load). ``"round_robin"``: texts are dealt to the live replicas
        in turn, with no regard to keys (the baseline ``make bench`` compares).
        """
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        with self._lock:
            live = self._live()
            if routing == "round_robin":
                out = [live[(self._next + i) % len(live)] for i in range(len(keys))]
                self._next = (self._next + len(keys)) % len(live)
                return out
            sizes: dict[str, int] = {}
            for k in keys:
                sizes[k] = sizes.get(k, 0) + 1
            placed = {r: self._load.get(r, 0) for r in live}
            cap = (1.0 + self.slack) * (sum(placed.values()) + len(keys)) / len(live)
            where: dict[str, str] = {}
            for key, size in sizes.items():
                r = self._sticky.get(key)
                if r not in placed:
                    order = rendezvous_order(key, live)
                    r = next((c for c in order if placed[c] + size <= cap), None)
                    if r is None:  # every choice full: the least loaded, ties to the preferred
                        r = min(order, key=lambda c: placed[c])
                self._sticky[key] = r
                self._sticky.move_to_end(key)
                placed[r] += size
                where[key] = r
            while len(self._sticky) > STICKY_KEYS:
                self._sticky.popitem(last=False)
            return [where[k] for k in keys]

    def fallbacks(self, key: str, first: str) -> list[str]:
        """``first``, then the other live replicas in ``key``'s order: where a failed request goes next."""
        live = self.live()
        return [first] + [r for r in rendezvous_order(key, live) if r != first]

    def moved(self, key: str, replica: str) -> None:
        """Record that ``key``'s texts now live on ``replica`` (a request moved there after a failure)."""
        with self._lock:
            self._sticky[key] = replica
            self._sticky.move_to_end(key)
