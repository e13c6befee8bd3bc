"""Our (source address, port) pairs toward one backend, reused as soon as TCP allows.

A translated connection reaches its backend from one of our addresses and a port of
``port_range``; the backend knows it by that 4-tuple. A pair given back is ready again
when the backend can take a new connection on the same 4-tuple:

* at once when the backend's side of the old connection is gone: our side (the SAL
  peer) closed first, so the backend's socket ended in LAST_ACK with the final ACK;
  or a reset ended it;
* after the backend's TIME_WAIT (60 s on Linux) when the backend closed first (or both
  at once), or when we cannot know (a handshake that timed out).

Pairs given back are reused first, in the order they become ready. When none is ready
and none is left unused, the pair longest in TIME_WAIT is taken early (``take_early``),
as a client host reuses its ports: the backend takes the new SYN if it is newer than the
old connection (RFC 6191: a newer timestamp; Linux, the BSDs and Windows do), or answers
it with an ACK, which the server gateway answers with a RST that ends the TIME_WAIT
before it sends the SYN again. Only pairs held by live flows are never handed out. Pairs never used
yet are walked from a random place (a restarted gateway must not walk straight into the
4-tuples its previous run left in TIME_WAIT), alternating between the source addresses,
so that a burst spreads over all of them. Nothing is allocated per pair until it is used.
"""
import heapq

TIME_WAIT = 60.0     # Linux's TCP_TIMEWAIT_LEN; Windows holds 120 s by default


class PortPool:
    def __init__(self, low: int, high: int, sources=(b"",), rng=None, exclude=()):
        """``sources``: our addresses facing the backend (``b""`` stands for the flow's
        own address, when the backend sees the client gateway's). ``exclude``: ports
        never to use (the backend's own, when it shares our address)."""
        self.low, self.high = low, high
        self.sources = list(sources)
        self.size = (high - low + 1) * len(self.sources)
        self.exclude = frozenset(exclude)
        self._start = rng.randrange(self.size) if rng is not None else 0
        self._walked = 0                 # how many never-used pairs were handed out
        self._back: list = []            # heap of (ready at, pair) given back
        self._adopted: set = set()       # leased out of walk order (resumed flows): the walk skips them
        self.leased: dict = {}           # pair -> the flow holding it (None while being set up)

    def take(self, now: float):
        """A pair ready for a new connection, leased until ``release``; None if none is."""
        back, leased = self._back, self.leased
        while back and back[0][0] <= now:
            pair = heapq.heappop(back)[1]
            if pair not in leased:
                leased[pair] = None
                return pair
        while self._walked < self.size:
            pair = self._pair(self._walked)
            self._walked += 1
            if pair[1] in self.exclude or pair in leased or pair in self._adopted:
                continue
            leased[pair] = None
            return pair
        return None

    def take_early(self):
        """The pair given back longest ago, still in the backend's TIME_WAIT, leased
        until ``release``; None when every pair is held by a live flow."""
        back, leased = self._back, self.leased
        while back:
            pair = heapq.heappop(back)[1]
            if pair not in leased:
                leased[pair] = None
                return pair
        return None

    def lease(self, pair) -> bool:
        """Lease a given pair (a flow resumed from a snapshot); False if it is not free."""
        if pair in self.leased or not self.low <= pair[1] <= self.high or pair[0] not in self.sources:
            return False
        self.leased[pair] = None
        self._adopted.add(pair)
        return True

    def release(self, pair, owner, ready_at: float) -> bool:
        """``owner`` gives ``pair`` back, ready at ``ready_at``. Only the flow holding it
        can: a flow that gave its pair back early (and whose pair another flow took)
        changes nothing when it is finally forgotten. True if the pair came back."""
        if pair not in self.leased or self.leased[pair] is not owner:
            return False
        del self.leased[pair]
        heapq.heappush(self._back, (ready_at, pair))
        return True

    def _pair(self, i: int):
        j = (self._start + i) % self.size
        k = len(self.sources)
        return self.sources[j % k], self.low + j // k

    @property
    def free(self) -> list[int]:
        """Ports not leased (ready, cooling or never used), once per free source
        address: for views and checks, not for the packet path."""
        leased = self.leased
        out = [pair[1] for _, pair in self._back if pair not in leased]
        for i in range(self._walked, self.size):
            pair = self._pair(i)
            if pair[1] not in self.exclude and pair not in self.leased and pair not in self._adopted:
                out.append(pair[1])
        return out

    def cooling(self, now: float) -> int:
        """Pairs given back that are not ready yet (the backend's TIME_WAIT)."""
        return sum(1 for at, _ in self._back if at > now)
