"""Iteration-level simulator: replays requests through one scheduling loop, step by step.

Each step the policy picks the batch (tokens per request) under the KV blocks, the token budget and the sequence
cap; the cost model gives the step's time; prefill chunks advance, a completed prefill or a decode step emits one
token, a preempted request drops its KV and later recomputes everything it had (vLLM V1 has no swap).

The loop is vLLM V1's `Scheduler.schedule()` (0.32) written out literally (`_schedule_literal`), so that the
`vllm` preset can be proven step-for-step against a real engine. Two exact shortcuts make it fast enough to
replay every window under tens of candidates:
  * decoding requests are kept implicitly: their computed-token count is `base + G`, where G counts steps, so
    a step in which every decoder runs costs O(1) for all of them (`_schedule_fast`);
  * a stretch of pure-decode steps with no arrival, finish, preemption or admission is advanced in closed form
    (`_fast_forward`): block crossings come from a histogram of `base mod block_size`, step times from an
    arithmetic series.
Both are exact: times are integer picoseconds, and tests compare them with plain stepping.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_shadow.adapters.events import EngineStep, RequestArrival
from vllm_shadow.costmodel.linear import LinearCostModel
from vllm_shadow.solver.policies import Policy, parse_policy
from vllm_shadow.solver.records import RequestRecord, SimResult

PS_PER_S = 10**12  # time is kept in integer picoseconds so that closed-form sums equal step-by-step sums


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request already in the engine when the simulation starts (the live shadow's window start)."""

    request: RequestArrival
    computed_tokens: int  # tokens whose KV is held
    generated_tokens: int  # output tokens produced so far


class _Req:
    __slots__ = (
        "arrival",
        "base",
        "computed",
        "epoch",
        "gen",
        "implicit",
        "key",
        "output",
        "prompt",
        "rec",
        "reserve",
        "rid",
    )

    def __init__(
        self, rid: str, arrival: int, prompt: int, output: int, key: tuple | None, rec: RequestRecord
    ) -> None:
        self.rid = rid
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.key = key  # waiting-queue order key (None under FCFS)
        self.rec = rec
        self.gen = 0  # output tokens produced
        self.computed = 0  # KV tokens held (explicit requests only)
        self.implicit = False  # decoding with computed == base + G
        self.base = 0
        self.epoch = 0  # bumps invalidate this request's entries in the finish heap
        self.reserve = 0  # blocks reserved at admission (no-eviction mode)


class _Waiting:
    """The waiting queue: FCFS deque (preempted go to the front) or a heap on the policy's order key."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.fifo: deque[_Req] = deque()
        self.heap: list[tuple[tuple, _Req]] = []
        self.size = 0  # an attribute, not __len__: it is read on every step

    def add(self, r: _Req) -> None:
        self.size += 1
        if self.ordered:
            heapq.heappush(self.heap, (r.key, r))
        else:
            self.fifo.append(r)

    def add_preempted(self, r: _Req) -> None:
        self.size += 1
        if self.ordered:
            heapq.heappush(self.heap, (r.key, r))
        else:
            self.fifo.appendleft(r)

    def peek(self) -> _Req:
        return self.heap[0][1] if self.ordered else self.fifo[0]

    def pop(self) -> _Req:
        self.size -= 1
        return heapq.heappop(self.heap)[1] if self.ordered else self.fifo.popleft()


class _Sim:
    def __init__(
        self,
        policy: Policy,
        cost: LinearCostModel,
        num_kv_blocks: int,
        block_size: int,
        record_steps: bool,
        fast: bool,
    ) -> None:
        if num_kv_blocks < 2 or block_size < 1:
            raise ValueError(
                f"need num_kv_blocks >= 2 and block_size >= 1, got {num_kv_blocks}, {block_size}"
            )
        self.p = policy
        self.bs = block_size
        self.num_blocks = num_kv_blocks
        self.usable = num_kv_blocks - 1  # vLLM reserves one null block
        self.wm_blocks = int(policy.watermark * num_kv_blocks)
        self.ca = round(cost.a * PS_PER_S)
        self.cb = round(cost.b * PS_PER_S)
        self.cc = round(cost.c * PS_PER_S)
        self.cd = round(cost.d * PS_PER_S)
        self.ce = round(cost.e * PS_PER_S)
        self.record_steps = record_steps
        self.fast = fast
        self.running: list[_Req] = []
        self.waiting = _Waiting(policy.order != "fcfs")
        self.used = 0  # blocks held
        self.reserved = 0  # blocks reserved by admitted requests (no-eviction mode)
        self.now = 0
        self.busy = 0
        self.steps = 0
        self.peak = 0
        self.tokens = 0
        self.seq = 0
        # Implicit decoders: computed = base + G; hist counts them by base mod block size.
        self.G = 0
        self.n_dec = 0
        self.sum_base = 0
        self.hist = [0] * block_size
        self.finish_heap: list[tuple[int, int, int, _Req]] = []
        self.admission_blocked = False  # last step's admission failed in a way a decode stretch cannot undo
        self.step_log: list[EngineStep] = []

    # ---- implicit decoders ---------------------------------------------------------------------------------

    def _make_implicit(self, r: _Req) -> None:
        """r has just become a decoder (computed == prompt + gen - 1) at the current G."""
        r.implicit = True
        r.base = r.computed - self.G
        r.epoch += 1
        self.n_dec += 1
        self.sum_base += r.base
        self.hist[r.base % self.bs] += 1
        self.seq += 1
        heapq.heappush(self.finish_heap, (r.prompt + r.output - 1 - r.base, self.seq, r.epoch, r))

    def _make_explicit(self, r: _Req) -> None:
        r.computed = r.base + self.G
        r.gen = r.computed - r.prompt + 1  # the decode invariant: every computed token but the last sampled
        r.implicit = False
        r.epoch += 1
        self.n_dec -= 1
        self.sum_base -= r.base
        self.hist[r.base % self.bs] -= 1

    def _computed(self, r: _Req) -> int:
        return r.base + self.G if r.implicit else r.computed

    # ---- queue operations ----------------------------------------------------------------------------------

    def _preempt(self, r: _Req) -> None:
        """Recompute preemption: drop all KV; the request goes back to the waiting queue."""
        if r.implicit:
            self._make_explicit(r)
        self.used -= _cdiv(r.computed, self.bs)
        r.rec.preemptions += 1
        r.rec.recomputed_tokens += r.computed
        r.computed = 0
        self.waiting.add_preempted(r)
        self.admission_blocked = False

    def _free(self, r: _Req) -> None:
        self.used -= _cdiv(self._computed(r), self.bs)
        self.reserved -= r.reserve
        if r.implicit:
            self._make_explicit(r)

    def _admission_fits(self, r: _Req, n: int, free: int) -> bool:
        wm = self.wm_blocks if self.running else 0
        p = self.p
        if not p.eviction:
            r.reserve = _cdiv(r.prompt + r.output - 1, self.bs)
            return self.reserved + r.reserve + wm <= self.usable
        if p.admission == "full-prompt" and _cdiv(r.prompt + r.gen, self.bs) + wm > free:
            return False
        if p.admission == "future-peak" and not self._peak_fits(r, self.usable - wm):
            return False
        return _cdiv(n, self.bs) + wm <= free

    def _peak_fits(self, cand: _Req, limit: int) -> bool:
        """LightLLM's check: will the running requests plus `cand` fit in `limit` blocks at their joint peak, if
        each runs to its end (output lengths are known to the simulator)? Each is counted at its full current
        sequence, as if its prefill were done."""
        # Every job at its final size at once bounds the peak from above: if that fits, so does the peak.
        finals = sum(r.prompt + r.output - 1 for r in self.running) + cand.prompt + cand.output - 1
        if _cdiv(finals, self.bs) + len(self.running) <= limit:
            return True
        jobs = []
        for r in [*self.running, cand]:
            gen = r.base + self.G - r.prompt + 1 if r.implicit else r.gen
            held = r.prompt + max(gen, 1) - 1 if r is not cand else r.prompt + gen
            jobs.append((r.prompt + r.output - 1 - held, held))
        jobs.sort()
        n = len(jobs)
        held_now = sum(h for _, h in jobs)
        for i, (left, held) in enumerate(jobs):
            # When the i-th shortest finishes, requests i.. have each grown by `left` tokens;
            # sum of ceil(x_j / bs) over `live` requests <= ceil(sum x_j / bs) + live - 1.
            live = n - i
            if _cdiv(held_now + live * left, self.bs) + live - 1 > limit:
                return False
            held_now -= held
        return True

    # ---- one step ------------------------------------------------------------------------------------------

    def _threshold(self) -> int:
        thr = self.p.long_prefill_token_threshold
        # vLLM: when only one request is eligible there is nobody to starve, so the cap is lifted.
        return thr if len(self.running) + self.waiting.size > 1 else 0

    def _admit(self, budget: int, sched: list[tuple[_Req, int, int]], thr: int) -> int:
        """Pass 2: admit waiting requests in queue order; returns the budget left. Records whether admission
        stopped for a reason that a stretch of pure decoding cannot undo (the fast-forward's precondition)."""
        p = self.p
        blocked = False
        while budget > 0 and self.waiting.size:
            if len(self.running) >= p.max_num_seqs:
                blocked = True
                break
            r = self.waiting.peek()
            n = r.prompt + r.gen  # a resumed request recomputes its generated tokens too
            if 0 < thr < n:
                n = thr
            if not p.chunked_prefill and n > budget and (budget < p.max_num_batched_tokens or sched):
                # Lasting only if no prefill chunk took budget this step: a decode stretch leaves it as is.
                blocked = not sched
                break
            n = min(n, budget) if p.chunked_prefill else n
            if not self._admission_fits(r, n, self.usable - self.used):
                r.reserve = 0
                blocked = True
                break
            self.waiting.pop()
            self.reserved += r.reserve
            self.running.append(r)
            self.used += _cdiv(n, self.bs)
            sched.append((r, n, 0))
            budget -= n
        self.admission_blocked = blocked and p.admission != "future-peak"
        return budget

    def _schedule_literal(self) -> tuple[list[tuple[_Req, int, int]], list[_Req], int]:
        """vLLM V1's schedule(), walked request by request. Returns (explicit scheduled (req, tokens, ctx),
        preempted, decoders run). Implicit decoders that run stay implicit; those that do not are made explicit."""
        p = self.p
        budget = p.max_num_batched_tokens
        thr = self._threshold()
        sched: list[tuple[_Req, int, int]] = []
        ran: dict[int, int] = {}  # implicit decoders scheduled: id -> blocks allocated
        preempted: list[_Req] = []
        static_admit = p.batching == "static" and not self.running
        self.admission_blocked = False

        if p.batching == "prefill-first" and self.waiting.size:
            self._admit(budget, sched, thr)
            if sched:
                return sched, preempted, 0  # a prefill-only step: the decoders wait

        if p.decode_first:
            decoding = [r for r in self.running if self._decoding(r)]
            self.running[:] = decoding + [r for r in self.running if not self._decoding(r)]
        i = 0
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            c = self._computed(r)
            n = r.prompt + self._gen(r) - c
            if 0 < thr < n:
                n = thr
            n = min(n, budget)
            if n <= 0:
                i += 1
                continue
            need = _cdiv(c + n, self.bs) - _cdiv(c, self.bs)
            while need > self.usable - self.used:
                if not p.eviction:
                    raise AssertionError("no-eviction admission reserved too little KV")  # an invariant
                if p.order == "priority":
                    victim = max(self.running, key=lambda q: (q.rec.priority, q.arrival))
                    idx = self.running.index(victim)
                    del self.running[idx]
                    if idx < i:
                        i -= 1
                    budget += self._unschedule(victim, sched, ran)
                else:
                    victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is r:
                    break
            if preempted and preempted[-1] is r:
                break
            self.used += need
            if r.implicit:
                ran[id(r)] = need
            else:
                sched.append((r, n, c))
            budget -= n
            i += 1
        self._freeze_decoders(ran)
        if not preempted and (p.batching == "continuous" or static_admit):
            self._admit(budget, sched, thr)
        return sched, preempted, self.n_dec

    def _unschedule(self, victim: _Req, sched: list[tuple[_Req, int, int]], ran: dict[int, int]) -> int:
        """Undo a priority victim's allocation made earlier in this step; returns the tokens given back."""
        if id(victim) in ran:
            self.used -= ran.pop(id(victim))
            return 1
        for j, (q, m, c) in enumerate(sched):
            if q is victim:
                self.used -= _cdiv(c + m, self.bs) - _cdiv(c, self.bs)
                del sched[j]
                return m
        return 0

    def _freeze_decoders(self, ran: dict[int, int]) -> None:
        """Implicit decoders advance with G; those that do not run this step must leave the implicit set."""
        if len(ran) != self.n_dec:
            for r in self.running:
                if r.implicit and id(r) not in ran:
                    self._make_explicit(r)

    def _decoding(self, r: _Req) -> bool:
        return r.implicit or (r.gen > 0 and r.computed == r.prompt + r.gen - 1)

    def _gen(self, r: _Req) -> int:
        return r.base + self.G - r.prompt + 1 if r.implicit else r.gen

    def _schedule_fast(self) -> tuple[list[tuple[_Req, int, int]], list[_Req], int] | None:
        """The common step in O(prefilling + admitted + preempted): every implicit decoder runs one token and
        the prefill chunks, all at the tail of the running queue, share the rest of the budget. Under FCFS,
        victims come from the tail, so vLLM's walk (preempt lazily when a request cannot allocate) pops exactly
        the victims that an eager "pop until the step's total need fits" pops: prefix needs never exceed the
        total. Returns (explicit scheduled, preempted, decoders run), or None when the literal walk must decide."""
        p = self.p
        sched: list[tuple[_Req, int, int]] = []
        thr = self._threshold()
        if p.batching == "prefill-first" and self.waiting.size:
            self._admit(p.max_num_batched_tokens, sched, thr)
            if sched:
                return sched, [], 0  # a prefill-only step: the decoders wait
        n_dec = self.n_dec
        budget = p.max_num_batched_tokens - n_dec
        if budget < 0:
            return None
        n_pref = len(self.running) - n_dec
        prefilling = self.running[n_dec:] if n_pref else ()
        total = self.hist[-self.G % self.bs]
        needs: list[int] = []
        for r in prefilling:
            if r.implicit:
                return None  # a prefilling request sits between decoders: the literal walk decides
            if budget <= 0:
                continue  # keep checking the order; vLLM's walk stops here
            n = r.prompt + r.gen - r.computed
            if 0 < thr < n:
                n = thr
            n = min(n, budget)
            need = _cdiv(r.computed + n, self.bs) - _cdiv(r.computed, self.bs)
            sched.append((r, n, r.computed))
            needs.append(need)
            total += need
            budget -= n
        preempted: list[_Req] = []
        if total > self.usable - self.used:
            if p.order == "priority" or not p.eviction:
                return None  # priority victims are not at the tail; the literal walk decides
            while total > self.usable - self.used:
                victim = self.running.pop()
                if sched and sched[-1][0] is victim:
                    sched.pop()
                    total -= needs.pop()
                elif victim.implicit and (victim.base + self.G) % self.bs == 0:
                    total -= 1
                self._preempt(victim)
                preempted.append(victim)
        self.used += total
        if not preempted and (p.batching == "continuous" or (p.batching == "static" and not self.running)):
            self._admit(budget, sched, thr)
        return sched, preempted, self.n_dec

    def _apply(self, sched: list[tuple[_Req, int, int]], n_dec: int, preempted: list[_Req]) -> None:
        """Charge the step's time, advance tokens, emit tokens, finish requests. `n_dec` implicit decoders ran
        (all of them, or none in a prefill-only step)."""
        tokens = n_dec
        kv = self.sum_base + n_dec * (self.G + 1) if n_dec else 0
        attn = 0
        for _r, n, c in sched:
            tokens += n
            kv += c + n
            if n > 1:
                attn += n * (c + n)
        if tokens == 0:
            return
        start = self.now
        dt = self.ca + self.cb * tokens + self.cc * kv + self.cd * attn + self.ce * (n_dec + len(sched))
        self.now += dt
        self.busy += dt
        self.tokens += tokens
        self.peak = max(self.peak, self.used)
        if self.record_steps:
            self._log_step(start, dt, sched, n_dec, preempted)
        self.steps += 1
        if n_dec:
            self.G += 1  # the implicit decoders advance one token
        end_s = self.now / PS_PER_S
        finished: list[_Req] = []
        for r, n, _c in sched:
            rec = r.rec
            if rec.first_scheduled != rec.first_scheduled:
                rec.first_scheduled = start / PS_PER_S
            r.computed += n
            if r.computed == r.prompt + r.gen:  # the chunk reached the end: a token is sampled
                r.gen += 1
                if r.gen == 1:
                    rec.first_token = end_s
                if r.gen == r.output:
                    finished.append(r)
                else:
                    self._make_implicit(r)
        heap = self.finish_heap
        while heap and heap[0][0] <= self.G:
            _g, _s, epoch, r = heapq.heappop(heap)
            if r.epoch == epoch and r.implicit:
                finished.append(r)
        if finished:
            self._finish(finished, end_s)

    def _finish(self, finished: list[_Req], end_s: float) -> None:
        for r in finished:
            r.rec.finish = end_s
            self._free(r)
        if len(finished) > 8:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
        else:
            for r in finished:
                self.running.remove(r)
        self.admission_blocked = False

    def _log_step(self, start: int, dt: int, sched, n_dec: int, preempted: list[_Req]) -> None:
        tokens = {r.rid: 1 for r in self.running if r.implicit} if n_dec else {}
        for r, n, _c in sched:
            tokens[r.rid] = n
        self.step_log.append(
            EngineStep(
                step=self.steps,
                start_time=start / PS_PER_S,
                duration=dt / PS_PER_S,
                scheduled_tokens=tokens,
                preempted=tuple(r.rid for r in preempted),
                kv_blocks_used=self.used,
            )
        )

    # ---- closed-form decode stretches ----------------------------------------------------------------------

    def _blocks_for(self, k: int) -> int:
        """Blocks the implicit decoders allocate over the next k steps: each crosses a block boundary every
        block_size steps, and in the first k mod block_size steps only those whose residue comes up do."""
        bs = self.bs
        q, s = divmod(k, bs)
        total = q * self.n_dec
        if s:
            # Residues crossing within s steps: (-G - o) mod bs for o < s, a circular range ending at -G mod bs.
            end = -self.G % bs
            first = end - s + 1
            hist = self.hist
            total += sum(hist[first : end + 1]) if first >= 0 else sum(hist[: end + 1]) + sum(hist[first:])
        return total

    def _fast_forward(self, next_arrival: int | None, next_arrival_step: int | None) -> bool:
        """Advance k >= 1 pure-decode steps at once when nothing but decoding can happen. Returns True if it did."""
        n = self.n_dec
        if n == 0 or n != len(self.running) or n > self.p.max_num_batched_tokens:
            return False
        static_full = self.p.batching == "static"  # running is non-empty here: a static batch admits nothing
        if self.waiting.size and not (self.admission_blocked or static_full):
            return False
        # Steps until the next finish; a stale heap entry can only make the stretch shorter, never wrong.
        k = max(self.finish_heap[0][0] - self.G, 1) if self.finish_heap else 1
        base_cost = self.ca + (self.cb + self.ce) * n + self.cc * (self.sum_base + n * self.G + n)
        slope = self.cc * n  # each step reads n more KV tokens than the last
        if next_arrival_step is not None:
            k = min(k, next_arrival_step - self.steps)
        if next_arrival is not None:
            gap = next_arrival - self.now
            if (k - 1) * base_cost + slope * (k - 1) * (k - 2) // 2 >= gap:  # the arrival comes first
                k = _steps_starting_before(gap, base_cost, slope)
        if k < 1:
            return False
        free = self.usable - self.used
        if n * _cdiv(k, self.bs) > free and self._blocks_for(k) > free:
            lo, hi = 0, k  # largest k whose allocations all fit
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._blocks_for(mid) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            if k < 1:
                return False
        blocks = self._blocks_for(k)
        total = k * base_cost + slope * k * (k - 1) // 2
        if self.record_steps:
            tokens = {r.rid: 1 for r in self.running}
            for j in range(k):
                self.step_log.append(
                    EngineStep(
                        step=self.steps + j,
                        start_time=(self.now + j * base_cost + slope * j * (j - 1) // 2) / PS_PER_S,
                        duration=(base_cost + slope * j) / PS_PER_S,
                        scheduled_tokens=dict(tokens),
                        kv_blocks_used=self.used + self._blocks_for(j + 1),
                    )
                )
        self.used += blocks
        self.peak = max(self.peak, self.used)
        self.now += total
        self.busy += total
        self.tokens += n * k
        self.steps += k
        self.G += k
        end_s = self.now / PS_PER_S
        finished = []
        heap = self.finish_heap
        while heap and heap[0][0] <= self.G:
            _g, _s, epoch, r = heapq.heappop(heap)
            if r.epoch == epoch and r.implicit:
                r.gen = r.output
                finished.append(r)
        if finished:
            self._finish(finished, end_s)
        return True


def _steps_starting_before(gap: int, base: int, slope: int) -> int:
    """How many steps start before `gap` when step j lasts base + slope*j: the count of j >= 0 with
    j*base + slope*j*(j-1)/2 < gap. A float estimate, corrected with exact integer arithmetic."""
    if slope:
        hb = base - slope / 2
        j = int((-hb + math.sqrt(hb * hb + 2 * slope * gap)) / slope) + 2
    else:
        j = gap // base + 2 if base else 0
    while j > 0 and j * base + slope * j * (j - 1) // 2 >= gap:
        j -= 1
    return j + 1


def _reorder(plan: tuple[list, list, int]) -> tuple[list, int, list]:
    sched, preempted, n_dec = plan
    return sched, n_dec, preempted


def _order_key(order: str, r: RequestArrival, arrival: int, index: int) -> tuple | None:
    if order == "fcfs":
        return None  # the FCFS queue is a deque in arrival order
    if order == "priority":
        return (r.priority, arrival, index)
    return (r.prompt_tokens if order == "prompt" else r.output_tokens, arrival, index)


def simulate(
    requests: Sequence[RequestArrival],
    policy: Policy | str,
    cost: LinearCostModel,
    *,
    num_kv_blocks: int,
    block_size: int,
    initial_running: Sequence[RunningRequest] = (),
    start_time: float | None = None,
    record_steps: bool = False,
    arrival_steps: Mapping[str, int] | None = None,
    fast_forward: bool = True,
) -> SimResult:
    """Replay `requests` (output lengths known) under `policy` on a KV cache of `num_kv_blocks` blocks
    (vLLM's count, including its null block) of `block_size` tokens.

    `initial_running` are requests already holding KV at `start_time`, in running-queue order.
    `arrival_steps` switches arrivals from time to step space: request id -> the number of non-empty steps
    the engine had run when the request entered its queue (the fidelity test's mode).
    `fast_forward=False` steps through the literal loop every time (the reference the shortcuts are tested on).
    """
    policy = parse_policy(policy)
    sim = _Sim(policy, cost, num_kv_blocks, block_size, record_steps, fast_forward)
    records: list[RequestRecord] = []
    pending: list[tuple[int, int, _Req]] = []  # (arrival time or step, index, request), sorted
    usable = num_kv_blocks - 1

    def make(index: int, r: RequestArrival) -> _Req:
        if r.output_tokens is None or r.output_tokens < 1:
            raise ValueError(f"request {r.request_id}: output_tokens must be known and >= 1 to simulate")
        if r.prompt_tokens < 1:
            raise ValueError(f"request {r.request_id}: prompt_tokens must be >= 1")
        if _cdiv(r.prompt_tokens + r.output_tokens - 1, block_size) > usable:
            raise ValueError(
                f"request {r.request_id}: {r.prompt_tokens}+{r.output_tokens} tokens can never fit in "
                f"{usable} KV blocks of {block_size} tokens"
            )
        arrival = round(r.time * PS_PER_S)
        # The record's arrival is on the simulator's picosecond clock, so latencies are never negative.
        rec = RequestRecord(r.request_id, arrival / PS_PER_S, r.prompt_tokens, r.output_tokens, r.priority)
        records.append(rec)
        return _Req(
            r.request_id,
            arrival,
            r.prompt_tokens,
            r.output_tokens,
            _order_key(policy.order, r, arrival, index),
            rec,
        )

    for index, state in enumerate(initial_running):
        q = make(index, state.request)
        q.gen = state.generated_tokens
        q.computed = state.computed_tokens
        if not 0 <= q.computed <= q.prompt + q.gen or q.gen >= q.output:
            raise ValueError(f"initial request {q.rid}: inconsistent state computed={q.computed} gen={q.gen}")
        if not policy.eviction:
            q.reserve = _cdiv(q.prompt + q.output - 1, block_size)
            sim.reserved += q.reserve
        sim.running.append(q)
        sim.used += _cdiv(q.computed, block_size)
        if q.gen > 0 and q.computed == q.prompt + q.gen - 1:
            sim._make_implicit(q)
    if sim.used > usable:
        raise ValueError(f"initial requests hold {sim.used} blocks, more than the {usable} available")
    offset = len(initial_running)
    for index, r in enumerate(requests):
        q = make(offset + index, r)
        when = arrival_steps[r.request_id] if arrival_steps is not None else q.arrival
        pending.append((when, offset + index, q))
    pending.sort()  # (when, index, request): indices are unique, requests never compared
    if start_time is not None:
        sim.now = round(start_time * PS_PER_S)
    elif arrival_steps is None and (initial_running or pending):
        sim.now = min([q.arrival for q in sim.running] + [t for t, _i, _q in pending[:1]])

    def feed_next(i: int) -> int:
        """Idle engine: jump to the next arrival (in time mode) and feed everything that arrives with it."""
        when = pending[i][0]
        if arrival_steps is None:
            sim.now = max(sim.now, when)
        while i < total and pending[i][0] == when:
            sim.waiting.add(pending[i][2])
            i += 1
        sim.admission_blocked = False
        return i

    nxt = 0
    total = len(pending)
    while True:
        # Feed arrivals: by time (the step starting now sees what arrived by now) or by step index.
        clock = sim.steps if arrival_steps is not None else sim.now
        fed = False
        while nxt < total and pending[nxt][0] <= clock:
            sim.waiting.add(pending[nxt][2])
            nxt += 1
            fed = True
        if fed:
            sim.admission_blocked = False
        if not sim.running and not sim.waiting.size:
            if nxt == total:
                break
            nxt = feed_next(nxt)
            continue
        if sim.fast:
            next_t = pending[nxt][0] if nxt < total and arrival_steps is None else None
            next_s = pending[nxt][0] if nxt < total and arrival_steps is not None else None
            if sim._fast_forward(next_t, next_s):
                continue
            plan = sim._schedule_fast()
            if plan is not None and (plan[0] or plan[1] or plan[2]):
                sim._apply(*_reorder(plan))
                continue
        sched, preempted, n_ran = sim._schedule_literal()
        if not sched and not n_ran:
            if preempted:
                continue  # the step only preempted; the next one admits
            if nxt < total:  # nothing fits until something arrives
                nxt = feed_next(nxt)
                continue
            raise RuntimeError(
                f"scheduler {policy} is stuck: {len(sim.running)} running, {sim.waiting.size} waiting, "
                f"{sim.usable - sim.used} free blocks"
            )
        sim._apply(sched, n_ran, preempted)
        for r in sim.running:  # hand decoders the walk made explicit back to the fast path
            if not r.implicit and r.gen > 0 and r.computed == r.prompt + r.gen - 1:
                sim._make_implicit(r)

    return SimResult(
        policy=str(policy),
        requests=records,
        gpu_seconds=sim.busy / PS_PER_S,
        num_steps=sim.steps,
        peak_kv_blocks=sim.peak,
        steps=sim.step_log if record_steps else None,
        tokens_processed=sim.tokens,
    )
