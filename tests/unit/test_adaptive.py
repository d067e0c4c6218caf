"""The speculation controller on fixed cost tables: k follows acceptance and costs, K = 0 wins
when verify tokens are expensive, load turns speculation down, probes revisit a low alpha."""

from __future__ import annotations

from specdec.spec.adaptive import SpeculationController
from specdec.core.request import Request, SamplingParams
from specdec.runner import CostModel


def cost(fixed: float, per_token: float) -> CostModel:
    model = CostModel()
    model.table = {n: fixed + per_token * n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)}
    return model


def decoding(n: int, **params) -> list[Request]:
    reqs = []
    for i in range(n):
        req = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=100, temperature=0.0,
                                                         **params))
        req.output_token_ids = [4]
        reqs.append(req)
    return reqs


def controller(target: CostModel, draft: CostModel | None = None, k_max: int = 5):
    return SpeculationController(k_max, True, target, draft, max_model_len=1024)


def test_cheap_verify_and_good_acceptance_speculate_deeply():
    ctl = controller(cost(0.100, 0.001), cost(0.002, 0.0001))  # bf16-like: verify ~ free
    reqs = decoding(1)
    for _ in range(5):
        ctl.observe("r0", 5, 5)  # everything accepted
    ctl.choose(reqs)
    assert reqs[0].num_lookahead_tokens == 5


def test_expensive_verify_tokens_mean_no_speculation():
    ctl = controller(cost(0.010, 0.050))  # each extra token costs 5x the fixed part
    ctl.observe("earlier", 5, 3)  # past the first-windows probe (below)
    reqs = decoding(1)
    ctl.choose(reqs)
    assert reqs[0].num_lookahead_tokens == 0


def test_a_fresh_engine_probes_where_good_acceptance_would_pay():
    """Verify tokens cost enough that the fixed 0.7 prior plans k = 0, while the acceptance
    code reaches (PROBE_ALPHA) would pay: until any window is verified, a lone request
    drafts conservatively; a crowd does not; once windows are seen, planning decides."""
    ctl = controller(cost(0.010, 0.050))
    alone = decoding(1)
    ctl.choose(alone)
    assert 0 < alone[0].num_lookahead_tokens <= ctl.conservative_k
    crowd = decoding(8)
    ctl.choose(crowd)
    assert [r.num_lookahead_tokens for r in crowd] == [0] * 8
    ctl.observe("r0", 2, 0)  # the probe's window was rejected: plan on what was seen
    ctl.choose(alone)
    assert alone[0].num_lookahead_tokens == 0
    hopeless = controller(cost(0.010, 0.500))  # not even alpha 0.9 pays: no probe
    ctl_reqs = decoding(1)
    hopeless.choose(ctl_reqs)
    assert ctl_reqs[0].num_lookahead_tokens == 0


def test_load_turns_speculation_down():
    # Compute-bound at batch size: per-token cost dominates once the batch is large.
    target = cost(0.050, 0.004)
    alone, crowd = decoding(1), decoding(32)
    ctl = controller(target, cost(0.005, 0.001))
    ctl.choose(alone)
    ctl.choose(crowd)
    assert alone[0].num_lookahead_tokens > 0
    assert sum(r.num_lookahead_tokens for r in crowd) == 0


def test_low_acceptance_falls_to_zero_then_recovers_slowly():
    ctl = controller(cost(0.100, 0.001))
    reqs = decoding(1)
    for _ in range(20):
        ctl.observe("r0", 4, 0)
    ks = []
    for _ in range(400):
        ctl.choose(reqs)
        ks.append(reqs[0].num_lookahead_tokens)
    assert ks[:50] == [0] * 50  # no draft while acceptance is poor
    assert ks[-1] > 0  # alpha drifted back toward the prior: speculation resumes


def test_fixed_and_seeded_requests_are_not_adapted():
    ctl = controller(cost(0.010, 0.050))  # adaptive would pick 0
    fixed = decoding(1, num_speculative_tokens=3)
    ctl.choose(fixed)
    assert fixed[0].num_lookahead_tokens == 3
    seeded = [Request("s", [1, 2], SamplingParams(temperature=0.8, seed=1, max_tokens=50))]
    seeded[0].output_token_ids = [3]
    ctl.choose(seeded)
    assert seeded[0].num_lookahead_tokens == 5
    near_end = decoding(1)
    near_end[0].output_token_ids = [4] * 98  # max_tokens 100: one more token, then the bonus
    ctl.choose(near_end)
    assert near_end[0].num_lookahead_tokens <= 1


def test_catch_up_is_paid_only_where_enough_tokens_are_left():
    # The draft's catch-up forward costs 4 ms per token; a draft step 5 ms; verify is cheap.
    ctl = controller(cost(0.100, 0.001), cost(0.005, 0.004))
    for rid in ("fresh-long", "fresh-short", "followed-short"):
        for _ in range(5):
            ctl.observe(rid, 5, 5)

    def request(rid: str, max_tokens: int, num_output: int, followed: bool) -> Request:
        req = Request(rid, list(range(3, 403)), SamplingParams(max_tokens=max_tokens,
                                                               temperature=0.0))
        req.output_token_ids = [7] * num_output
        req.draft_num_computed_tokens = req.num_tokens - 1 if followed else 0
        return req

    long_left = request("fresh-long", 500, 1, followed=False)  # 400 missed, 499 to go
    short_left = request("fresh-short", 10, 6, followed=False)  # 406 missed, 4 to go
    followed = request("followed-short", 10, 6, followed=True)  # 1 missed, 4 to go
    assert ctl.catch_up(long_left) == 401 and ctl.catch_up(followed) == 1
    for req in (long_left, short_left, followed):
        ctl.choose([req])
    assert long_left.num_lookahead_tokens > 0  # 1.6 s once, over ~100 steps: worth it
    assert short_left.num_lookahead_tokens == 0  # 1.6 s for the last 4 tokens: never
    assert followed.num_lookahead_tokens > 0


def test_catch_up_is_amortized_over_a_short_horizon_under_load():
    # 400 missed tokens at 2 ms each: 0.8 s per request. Over the ~100 steps a 600-token
    # request has left it would look cheap; with a crowd k may fall to 0 right after, so
    # only CATCH_UP_HORIZON steps count, and none of 8 fresh requests pays it, while the
    # same 8 requests, followed, do speculate.
    ctl = controller(cost(0.100, 0.001), cost(0.005, 0.002))
    crowd = []
    for i in range(8):
        for _ in range(5):
            ctl.observe(f"r{i}", 5, 5)
        req = Request(f"r{i}", list(range(3, 403)), SamplingParams(max_tokens=600,
                                                                   temperature=0.0))
        req.output_token_ids = [7]
        crowd.append(req)
    ctl.choose(crowd)
    assert [r.num_lookahead_tokens for r in crowd] == [0] * 8
    for req in crowd:
        req.draft_num_computed_tokens = req.num_tokens - 1  # followed: nothing to catch up
    ctl.choose(crowd)
    assert all(r.num_lookahead_tokens > 0 for r in crowd)


def test_a_lone_request_pays_its_prompt_catch_up_over_a_longer_horizon():
    # The same 8 s catch-up for one request at batch 1 spread over CATCH_UP_HORIZON_FEW
    # steps: worth it (plain decode of 600 tokens takes 60 s). A 60-token chat prompt at the
    # fixed 0.7 prior was never worth it over 8 steps: k stayed 0 for the whole request.
    from specdec.spec import adaptive

    ctl = controller(cost(0.100, 0.001), cost(0.005, 0.020))
    for _ in range(5):
        ctl.observe("r", 5, 5)
    req = Request("r", list(range(3, 403)), SamplingParams(max_tokens=600, temperature=0.0))
    req.output_token_ids = [7]
    ctl.choose([req])
    assert req.num_lookahead_tokens > 0
    lone = controller(cost(0.100, 0.001), cost(0.005, 0.020))
    for _ in range(5):
        lone.observe("r", 5, 5)
    old = adaptive.CATCH_UP_HORIZON_FEW
    try:
        adaptive.CATCH_UP_HORIZON_FEW = adaptive.CATCH_UP_HORIZON  # the old rule
        lone.choose([req])
        assert req.num_lookahead_tokens == 0
    finally:
        adaptive.CATCH_UP_HORIZON_FEW = old


def test_a_new_request_starts_from_the_acceptance_seen_lately():
    """A draft that has been accepted ~90 % of the time gives the next request that prior,
    not the fixed one; a poor stretch never lowers a new request's prior below it."""
    from specdec.spec.adaptive import PRIOR_ACCEPT

    ctl = controller(cost(0.010, 0.001))
    assert ctl.prior() == PRIOR_ACCEPT
    for _ in range(30):
        ctl.observe("old", 5, 5)
        ctl.observe("old", 5, 4)
    assert ctl.prior() > 0.85
    fresh = decoding(1)
    ctl.choose(fresh)
    assert abs(ctl.stats[fresh[0].request_id].alpha - ctl.prior()) < 1e-9
    for _ in range(200):
        ctl.observe("bad", 5, 0)
    assert ctl.prior() == PRIOR_ACCEPT
