"""The continuous-batching sampler (a fixed number of slots, refilled from a queue of rows) against references that
know nothing of slots: a plain greedy loop over the full model forward (no KV cache), transformers' greedy `generate`
and teacher-forced log-probs, and the same sampled call run one row at a time (one slot). Also: per-row token limits,
temperatures and stop ids, the empty queue, and prompts over the engine's limit."""

import dataclasses
import math

import hf_models
import numpy as np
import pytest

from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.sampling import Sampler, SampleOutput, SamplingConfig, _distinct_prompts
from test_sampler import hf_greedy, pick_eos, reference_logprobs, teacher_forced_logits  # the same references

PAD = 0
MAX_PROMPT = 32
MAX_NEW = 10
PROMPTS = hf_models.random_prompts([3, 9, 5, 14, 1, 7], vocab_size=96, pad_id=PAD, seed=11)
ROWS = len(PROMPTS)
SLOTS = 2  # fewer than ROWS: rows wait for a slot, and finished rows hand theirs on
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0)
SAMPLED = {"T1": SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0),
           "T0.7-top5": SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_k=5)}
# Sampled calls: 3 prompts x n=2 = 6 rows, with limits that end them at different times (so they change slots).
SAMPLED_PROMPTS = PROMPTS[:3]
SAMPLED_LIMITS = [MAX_NEW, 3, 7, 1, MAX_NEW, 5]


# --- references -------------------------------------------------------------------------------------------------------

def plain_greedy(model, prompts, max_new: int, eos: int) -> np.ndarray:
  """Greedy decoding the plain way: every step runs the whole model (decoder.forward, no cache) over prompt + tokens so
  far and takes the argmax at each row's last token; pad after EOS. Rows are right-padded to one width (one compile)."""
  sequences = [list(p) for p in prompts]
  width = max(map(len, prompts)) + max_new
  out = np.full((len(prompts), max_new), PAD, np.int32)
  live = np.ones(len(prompts), bool)
  for step in range(max_new):
    tokens, valid = np.full((len(prompts), width), PAD, np.int32), np.zeros((len(prompts), width), bool)
    for r, seq in enumerate(sequences):
      tokens[r, :len(seq)], valid[r, :len(seq)] = seq, True
    logits = np.asarray(hf_models.our_logits(model, tokens, valid))
    chosen = logits[np.arange(len(prompts)), [len(s) - 1 for s in sequences]].argmax(axis=-1)
    for r in np.flatnonzero(live):
      out[r, step] = chosen[r]
      sequences[r].append(int(chosen[r]))
      live[r] = chosen[r] != eos
  return out


def assert_well_formed(out: SampleOutput) -> None:
  """mask is exactly the first `lengths` tokens; pad and log-prob 0 after them."""
  np.testing.assert_array_equal(out.mask, np.arange(out.tokens.shape[1])[None, :] < out.lengths[:, None])
  assert (out.tokens[~out.mask] == PAD).all() and (out.logprobs[~out.mask] == 0).all()


# --- fixtures: one model, EOS and two-slot sampler per variant; more slot counts for qwen2 ----------------------------

@dataclasses.dataclass
class Case:
  model: object
  reference: object  # the transformers model
  eos: int
  sampler: Sampler  # SLOTS slots, eos_ids=[eos]
  greedy: SampleOutput  # the sampler's greedy output on PROMPTS
  stats: dict  # its last_stats after that call


@pytest.fixture(scope="module")
def cases(tiny_hf_model):
  built = {}

  def get(variant: str) -> Case:
    if variant not in built:
      checkpoint, reference = tiny_hf_model(variant)
      model = load_hf_model(checkpoint)
      eos = pick_eos(hf_greedy(reference, PROMPTS, MAX_NEW, eos=None))
      sampler = Sampler(model, eos_ids=[eos], pad_id=PAD, max_prompt_len=MAX_PROMPT, slots=SLOTS)
      greedy = sampler.generate(PROMPTS, GREEDY)
      built[variant] = Case(model, reference, eos, sampler, greedy, dict(sampler.last_stats))
    return built[variant]

  return get


@pytest.fixture(scope="module")
def qwen2(cases):
  return cases("qwen2")


@pytest.fixture(scope="module")
def sampled(qwen2):
  """(mode, slots, seed) -> (output, last_stats) of the sampled qwen2 call on SAMPLED_PROMPTS x 2 with SAMPLED_LIMITS;
  slots 0: one slot per row."""
  samplers, runs = {SLOTS: qwen2.sampler}, {}

  def run(mode: str, slots: int, seed: int = 7):
    if slots not in samplers:
      samplers[slots] = Sampler(qwen2.model, eos_ids=[qwen2.eos], pad_id=PAD, max_prompt_len=MAX_PROMPT, slots=slots)
    if (mode, slots, seed) not in runs:
      sampler = samplers[slots]
      out = sampler.generate(SAMPLED_PROMPTS, SAMPLED[mode], n=2, seed=seed, row_max_new_tokens=SAMPLED_LIMITS)
      runs[mode, slots, seed] = out, dict(sampler.last_stats)
    return runs[mode, slots, seed]

  return run


# --- greedy: the plain path and transformers, token for token ---------------------------------------------------------

# Every new slot count or sampling mode compiles its own prefill and decode programs (a few seconds each on CPU): the
# fast tier runs qwen2 with 1 and 2 slots, greedy, T=1 and mixed; other models, slot counts and top-k are slow.
VARIANTS = ["qwen2", pytest.param("llama_gqa", marks=pytest.mark.slow), pytest.param("qwen3", marks=pytest.mark.slow)]
SLOW_MODE = pytest.param("T0.7-top5", marks=pytest.mark.slow)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_with_fewer_slots_than_rows_equals_the_plain_loop_and_transformers(cases, variant):
  case = cases(variant)
  ours = case.greedy
  assert case.stats["slots"] == SLOTS and case.stats["prefills"] >= math.ceil(ROWS / SLOTS)  # rows waited for slots
  assert (ours.lengths < MAX_NEW).any() and (ours.lengths == MAX_NEW).any()  # EOS really stopped some rows early
  np.testing.assert_array_equal(ours.tokens, plain_greedy(case.model, PROMPTS, MAX_NEW, case.eos))
  np.testing.assert_array_equal(ours.tokens, hf_greedy(case.reference, PROMPTS, MAX_NEW, eos=case.eos))
  stopped = ours.tokens[np.arange(ROWS), ours.lengths - 1] == case.eos
  np.testing.assert_array_equal(stopped, ours.lengths < MAX_NEW)
  assert_well_formed(ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_logprobs_are_log_softmax_of_teacher_forced_logits(cases, variant):
  case = cases(variant)
  ours = case.greedy
  expected = reference_logprobs(teacher_forced_logits(case.reference, PROMPTS, ours), ours.tokens, temperature=1.0)
  np.testing.assert_allclose(ours.logprobs[ours.mask], expected[ours.mask], atol=1e-4)


@pytest.mark.slow  # cache lengths of their own: ~20 s of compiles
def test_greedy_with_a_cache_that_grows_with_the_longest_row_equals_the_plain_loop(qwen2):
  """Here short prompts, 24 new tokens and buckets from 4 positions with 2 steps of headroom make
  the engine start with an 8-position cache and grow it with its longest row."""
  assert hasattr(Sampler, "SMALLEST_CACHE") and hasattr(Sampler, "SEGMENT_STEPS")  # else the knobs below do nothing
  prompts, max_new = hf_models.random_prompts([2, 4, 1, 3, 4, 2], vocab_size=96, pad_id=PAD, seed=5), 24
  sampler = Sampler(qwen2.model, eos_ids=[qwen2.eos], pad_id=PAD, max_prompt_len=MAX_PROMPT,
                    prompt_buckets=(4, MAX_PROMPT), slots=SLOTS)
  sampler.SMALLEST_CACHE, sampler.SEGMENT_STEPS = 4, 2
  out = sampler.generate(prompts, SamplingConfig(max_new_tokens=max_new, temperature=0.0))
  assert (out.lengths == max_new).any() and (out.lengths < max_new).any()
  np.testing.assert_array_equal(out.tokens, plain_greedy(qwen2.model, prompts, max_new, qwen2.eos))
  expected = reference_logprobs(teacher_forced_logits(qwen2.reference, prompts, out), out.tokens, temperature=1.0)
  np.testing.assert_allclose(out.logprobs[out.mask], expected[out.mask], atol=1e-4)
  assert_well_formed(out)


# --- sampled: a row's tokens depend on the seed and its index, not on its slot ----------------------------------------

SLOT_COUNTS = [("T1", 2)] + [pytest.param(mode, slots, marks=pytest.mark.slow) for mode, slots in
                             [("T1", 3), ("T1", 0), ("T0.7-top5", 2), ("T0.7-top5", 3), ("T0.7-top5", 0)]]


@pytest.mark.parametrize("mode, slots", SLOT_COUNTS)  # against one slot: every row alone, in queue order
def test_a_seed_draws_the_same_tokens_whatever_the_slot_count(sampled, mode, slots):
  got, _ = sampled(mode, slots)
  one_row_at_a_time, _ = sampled(mode, 1)
  np.testing.assert_array_equal(got.tokens, one_row_at_a_time.tokens)
  np.testing.assert_array_equal(got.lengths, one_row_at_a_time.lengths)
  np.testing.assert_allclose(got.logprobs, one_row_at_a_time.logprobs, atol=1e-5)


def test_a_prompt_runs_once_for_up_to_max_prompt_copies_rows():
  prompts = [[1, 2], [3], [1, 2], [1, 2], [3], [1, 2]]
  assert _distinct_prompts(prompts, 8) == ([(1, 2), (3,)], [0, 1, 0, 0, 1, 0])
  assert _distinct_prompts(prompts, 2) == ([(1, 2), (3,), (1, 2)], [0, 1, 0, 2, 1, 2])
  assert _distinct_prompts(prompts, 1) == ([tuple(p) for p in prompts], list(range(6)))


@pytest.mark.slow
def test_rows_sharing_a_prompt_draw_what_they_draw_when_each_runs_its_own(qwen2):
  """One prefill of 3 prompts x n=3 (a slot per row): each prompt runs once and its cache goes to 3 slots. The same
  tokens and log-probs as with every row's prompt run on its own (MAX_PROMPT_COPIES 1)."""
  outs = []
  for copies in (8, 1):
    sampler = Sampler(qwen2.model, eos_ids=[qwen2.eos], pad_id=PAD, max_prompt_len=MAX_PROMPT)
    sampler.MAX_PROMPT_COPIES = copies
    outs.append(sampler.generate(SAMPLED_PROMPTS, SAMPLED["T1"], n=3, seed=3))
    assert sampler.last_stats["prefills"] == 1 and sampler.last_stats["slots"] == 9
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)  # another prefill batch: rounding
  assert (outs[0].tokens[0] != outs[0].tokens[1]).any()  # the copies of a prompt still draw their own tokens


@pytest.mark.parametrize("mode", ["T1", SLOW_MODE])
def test_another_seed_draws_other_tokens(sampled, mode):
  assert (sampled(mode, SLOTS, seed=7)[0].tokens != sampled(mode, SLOTS, seed=8)[0].tokens).any()


def test_the_samples_of_one_prompt_are_drawn_independently(sampled):
  out, _ = sampled("T1", SLOTS)
  common = np.minimum(out.lengths[0::2], out.lengths[1::2])  # rows 2i and 2i+1 continue prompt i
  assert any((out.tokens[2 * i, :m] != out.tokens[2 * i + 1, :m]).any() for i, m in enumerate(common))


@pytest.mark.parametrize("mode", ["T1", SLOW_MODE])
def test_sampled_logprobs_with_fewer_slots_than_rows_equal_the_teacher_forced_reference(sampled, qwen2, mode):
  out, _ = sampled(mode, SLOTS)
  config = SAMPLED[mode]
  logits = teacher_forced_logits(qwen2.reference, SAMPLED_PROMPTS, out)
  expected = reference_logprobs(logits, out.tokens, config.temperature, config.top_k)
  np.testing.assert_allclose(out.logprobs[out.mask], expected[out.mask], atol=1e-4)
  assert_well_formed(out)
  if config.top_k:
    drawn_logit = np.take_along_axis(logits, out.tokens[..., None], axis=-1)
    assert ((logits > drawn_logit).sum(axis=-1)[out.mask] < config.top_k).all()


@pytest.mark.parametrize("slots", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(0, marks=pytest.mark.slow)])
def test_the_engine_fills_its_slots_and_refills_them_as_rows_finish(sampled, qwen2, slots):
  out, stats = sampled("T1", slots)
  used = slots or ROWS  # 0 and no cache budget: one slot per row
  assert stats["slots"] == used
  assert stats["prefills"] >= math.ceil(ROWS / used)  # a prefill fills free slots only: the rest waited for one
  assert stats["tokens"] == out.mask.sum()
  # Every row ran until its own limit or its EOS, whichever came first.
  limits = np.asarray(SAMPLED_LIMITS)
  ended_on_eos = out.tokens[np.arange(ROWS), out.lengths - 1] == qwen2.eos
  assert (out.lengths <= limits).all() and ((out.lengths == limits) | ended_on_eos).all()
  assert len(set(out.lengths.tolist())) >= 3  # rows really finished at different steps


# --- per-row limits, temperatures and stop ids ------------------------------------------------------------------------

ROW_LIMITS = [1, 3, MAX_NEW, 2, MAX_NEW, 5]


def test_rows_stop_at_their_own_limit_with_the_unconstrained_greedy_prefix(qwen2):
  free = qwen2.greedy
  limits = np.asarray(ROW_LIMITS)
  assert (limits < free.lengths).sum() >= 3  # the limits really cut rows that would run on
  out = qwen2.sampler.generate(PROMPTS, GREEDY, row_max_new_tokens=ROW_LIMITS)
  expected_lengths = np.minimum(limits, free.lengths)
  np.testing.assert_array_equal(out.lengths, expected_lengths)
  assert_well_formed(out)
  np.testing.assert_array_equal(out.tokens, np.where(out.mask, free.tokens, PAD))
  np.testing.assert_allclose(out.logprobs, np.where(out.mask, free.logprobs, 0.0), atol=1e-5)
  full = out.lengths == MAX_NEW
  assert full.any() and out.mask[full].all() and not (out.tokens[full] == qwen2.eos).any()
  assert qwen2.sampler.last_stats["tokens"] == expected_lengths.sum()


@pytest.mark.slow
def test_a_greedy_row_in_a_sampled_call_equals_the_greedy_output(qwen2):
  temperatures = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
  greedy_rows = np.asarray(temperatures) == 0
  mixed = qwen2.sampler.generate(PROMPTS, SAMPLED["T1"], seed=5, row_temperatures=temperatures)
  all_sampled = qwen2.sampler.generate(PROMPTS, SAMPLED["T1"], seed=5)
  np.testing.assert_array_equal(mixed.tokens[greedy_rows], qwen2.greedy.tokens[greedy_rows])
  np.testing.assert_allclose(mixed.logprobs[greedy_rows], qwen2.greedy.logprobs[greedy_rows], atol=1e-5)
  # The other rows keep their own keys: the same draws as in a call where every row samples.
  np.testing.assert_array_equal(mixed.tokens[~greedy_rows], all_sampled.tokens[~greedy_rows])
  assert (mixed.tokens[~greedy_rows] != qwen2.greedy.tokens[~greedy_rows]).any()  # and they did sample


def _row_stop_token(out: SampleOutput, eos: int) -> tuple[int, int, int]:
  """(row, token, index): `token` first appears in `row` at `index`, before the row's last token, and appears before
  the last token of another row too, so a stop id that leaked to other rows would shorten one."""
  for row in range(out.tokens.shape[0]):
    for index in range(1, out.lengths[row] - 1):
      token = out.tokens[row, index]
      if token in (PAD, eos) or token in out.tokens[row, :index]:
        continue
      elsewhere = [r for r in range(out.tokens.shape[0]) if r != row and token in out.tokens[r, :out.lengths[r] - 1]]
      if elsewhere:
        return row, int(token), index
  raise AssertionError("no token fits as a per-row stop id; change the prompts' seed")


def test_a_rows_own_stop_id_stops_only_that_row(qwen2):
  free = qwen2.greedy
  row, token, index = _row_stop_token(free, qwen2.eos)
  stop_ids = [[] for _ in range(ROWS)]
  stop_ids[row] = [token]
  out = qwen2.sampler.generate(PROMPTS, GREEDY, row_stop_ids=stop_ids)
  expected_lengths = free.lengths.copy()
  expected_lengths[row] = index + 1  # the stop token is the row's last generated token
  np.testing.assert_array_equal(out.lengths, expected_lengths)
  assert_well_formed(out)
  np.testing.assert_array_equal(out.tokens, np.where(out.mask, free.tokens, PAD))


# --- an empty queue, and rows that finish at their first token --------------------------------------------------------

def test_an_empty_call_returns_no_rows_and_runs_nothing(qwen2):
  qwen2.sampler.generate(PROMPTS[:2], GREEDY)
  assert qwen2.sampler.last_stats["segments"] > 0  # so the zeros below are the empty call's own
  out = qwen2.sampler.generate([], GREEDY)
  assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (0, MAX_NEW) and out.lengths.shape == (0,)
  assert qwen2.sampler.last_stats["segments"] == 0 and qwen2.sampler.last_stats["prefills"] == 0


def test_rows_that_all_stop_at_their_first_token_run_no_decode_segment(qwen2):
  out = qwen2.sampler.generate(PROMPTS, GREEDY, row_max_new_tokens=[1] * ROWS)
  stats = qwen2.sampler.last_stats
  assert stats["segments"] == 0 and stats["prefills"] >= math.ceil(ROWS / SLOTS)
  np.testing.assert_array_equal(out.lengths, np.ones(ROWS))
  np.testing.assert_array_equal(out.tokens[:, 0], qwen2.greedy.tokens[:, 0])
  assert_well_formed(out)


# --- bad input --------------------------------------------------------------------------------------------------------
# Policy.generate left-truncates templated prompts over the limit and counts them in `prompts_truncated` before it calls
# the sampler: test_long_prompts.py::test_a_templated_prompt_over_the_limit_is_left_truncated_not_an_error.

def test_a_prompt_over_the_engines_limit_is_a_value_error_naming_it(qwen2):
  prompts = [[2] * 4, [2] * (MAX_PROMPT + 1)]
  with pytest.raises(ValueError, match=f"prompt 1 has {MAX_PROMPT + 1} tokens; the sampler's max_prompt_len is "
                                       f"{MAX_PROMPT}"):
    qwen2.sampler.generate(prompts, GREEDY)


@pytest.mark.parametrize("bad", [0, MAX_NEW + 1])
def test_a_row_limit_outside_one_to_max_new_tokens_is_a_value_error_naming_the_row(qwen2, bad):
  limits = [MAX_NEW] * ROWS
  limits[4] = bad
  with pytest.raises(ValueError, match=r"\brow 4\b"):
    qwen2.sampler.generate(PROMPTS, GREEDY, row_max_new_tokens=limits)
