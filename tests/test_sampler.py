"""The jitted sampler against transformers: greedy `generate` token for token, log-probs against a teacher-forced
forward pass, the sampled distribution against softmax(logits), filtering, seeding, row layout and compile counts."""

import dataclasses

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flax import nnx

from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.models.decoder import write_rows
from p2o_jax.sampling import Sampler, SamplingConfig, chunk_rows, kv_cache_bytes_per_row
from p2o_jax.slot_programs import decode_segment, prefill_slots
from p2o_jax.token_sampling import filter_logits, first_argmax

PAD = 0
SAMPLED_EOS = 1
MAX_PROMPT = 32  # default buckets: (16, 32)
MAX_NEW = 10
PROMPTS = hf_models.random_prompts([3, 9, 5, 14, 1, 7], vocab_size=96, pad_id=PAD, seed=11)  # all in bucket 16


@pytest.fixture(scope="module")
def qwen2(tiny_hf_model):
  checkpoint, reference = tiny_hf_model("qwen2")
  return load_hf_model(checkpoint), reference


@pytest.fixture(scope="module")
def sampler(qwen2):
  return Sampler(qwen2[0], eos_ids=[SAMPLED_EOS], pad_id=PAD, max_prompt_len=MAX_PROMPT)


def hf_greedy(reference, prompts, max_new: int, eos: int | None) -> np.ndarray:
  """transformers' greedy continuations (rows, max_new), pad after a row's EOS (and after all rows stopped)."""
  tokens, valid = hf_models.pad_left(prompts, PAD)
  config = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                                         pad_token_id=PAD, bos_token_id=None)
  with torch.no_grad():
    out = reference.generate(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                             attention_mask=torch.from_numpy(valid.astype(np.int64)), generation_config=config)
  new = out[:, tokens.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=PAD)


def teacher_forced_logits(reference, prompts, out) -> np.ndarray:
  """(rows, max_new, vocab): transformers' logits predicting each generated token of each row, given all before it."""
  n = out.tokens.shape[0] // len(prompts)  # rows are prompt-major: row r continues prompt r // n
  sequences = [prompts[r // n] + out.tokens[r, :out.lengths[r]].tolist() for r in range(out.tokens.shape[0])]
  tokens, valid = hf_models.pad_left(sequences, PAD)
  logits = hf_models.hf_logits(reference, tokens, valid)
  width = tokens.shape[1]
  result = np.zeros(out.tokens.shape + (logits.shape[-1],), np.float32)
  for r, length in enumerate(out.lengths):
    result[r, :length] = logits[r, width - length - 1:width - 1]
  return result


def reference_logprobs(logits: np.ndarray, tokens: np.ndarray, temperature: float, top_k: int = 0) -> np.ndarray:
  """log_softmax(logits / T) restricted to the top-k logits, at the sampled tokens (NumPy, float64)."""
  z = logits.astype(np.float64) / temperature
  if top_k:
    kth = -np.sort(-z, axis=-1)[..., top_k - 1:top_k]
    z = np.where(z >= kth, z, -np.inf)
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  return np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def pick_eos(continuations: np.ndarray) -> int:
  """A token that one row emits mid-sequence while another row never emits it: EOS then stops some rows, not all."""
  n = continuations.shape[1]
  for token in np.unique(continuations):
    present = (continuations == token).any(axis=1)
    first = np.where(present, (continuations == token).argmax(axis=1), n)
    if token != PAD and ((first >= 1) & (first <= n - 3)).any() and (~present).any():
      return int(token)
  raise AssertionError("no token fits as a mid-sequence EOS; change the prompts' seed")


# --- greedy -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_run(qwen2):
  """Our greedy output on PROMPTS with an EOS some rows hit early, and transformers' output for the same EOS."""
  policy, reference = qwen2
  eos = pick_eos(hf_greedy(reference, PROMPTS, MAX_NEW, eos=None))
  greedy_sampler = Sampler(policy, eos_ids=[eos], pad_id=PAD, max_prompt_len=MAX_PROMPT)
  ours = greedy_sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0))
  return greedy_sampler, ours, hf_greedy(reference, PROMPTS, MAX_NEW, eos=eos), eos


def test_greedy_matches_transformers_generate_token_for_token(greedy_run):
  _, ours, expected, eos = greedy_run
  assert (ours.lengths < MAX_NEW).any() and (ours.lengths == MAX_NEW).any()  # EOS really stopped some rows early
  np.testing.assert_array_equal(ours.tokens, expected)
  stopped = ours.tokens[np.arange(len(PROMPTS)), ours.lengths - 1] == eos
  np.testing.assert_array_equal(stopped, ours.lengths < MAX_NEW)
  np.testing.assert_array_equal(ours.mask, np.arange(MAX_NEW)[None, :] < ours.lengths[:, None])


def test_greedy_logprobs_are_teacher_forced_log_softmax(greedy_run, qwen2):
  _, ours, _, _ = greedy_run
  expected = reference_logprobs(teacher_forced_logits(qwen2[1], PROMPTS, ours), ours.tokens, temperature=1.0)
  np.testing.assert_allclose(ours.logprobs[ours.mask], expected[ours.mask], atol=1e-4)
  assert (ours.logprobs[~ours.mask] == 0).all()


def test_n_samples_per_prompt_are_prompt_major_rows(greedy_run):
  greedy_sampler, single, _, _ = greedy_run
  # 3 prompts x 3 samples = 9 rows would change the batch bucket (and compile); 3 x 2 = 6 stays in bucket 8.
  repeated = greedy_sampler.generate(PROMPTS[:3], SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0), n=2)
  np.testing.assert_array_equal(repeated.tokens, np.repeat(single.tokens[:3], 2, axis=0))
  np.testing.assert_array_equal(repeated.lengths, np.repeat(single.lengths[:3], 2))


# --- sampled ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, top_k", [(0.7, 0), (1.5, 5)])
def test_sampled_logprobs_equal_teacher_forced_reference(sampler, qwen2, temperature, top_k):
  prompts = PROMPTS[:4]
  out = sampler.generate(prompts, SamplingConfig(max_new_tokens=MAX_NEW, temperature=temperature, top_k=top_k),
                         n=2, seed=3)
  logits = teacher_forced_logits(qwen2[1], prompts, out)
  expected = reference_logprobs(logits, out.tokens, temperature, top_k)
  np.testing.assert_allclose(out.logprobs[out.mask], expected[out.mask], atol=1e-4)
  if top_k:
    drawn_logit = np.take_along_axis(logits, out.tokens[..., None], axis=-1)
    rank = (logits > drawn_logit).sum(axis=-1)
    assert (rank[out.mask] < top_k).all()
    # Without the filter this many draws would fall outside the top k, so "none did" is evidence, not luck.
    probs = np.exp(logits / temperature - logits.max(-1, keepdims=True) / temperature)
    probs /= probs.sum(-1, keepdims=True)
    outside_mass = 1 - np.sort(probs, axis=-1)[..., -top_k:].sum(-1)
    assert outside_mass[out.mask].sum() > 10


def test_fixed_seed_repeats_and_another_seed_differs(sampler):
  config = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7)
  first, again, other = (sampler.generate(PROMPTS[:4], config, n=2, seed=s) for s in (7, 7, 8))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.logprobs, again.logprobs)
  assert (first.tokens != other.tokens).any()


# Chi-square critical value for 15 degrees of freedom (16 bins) at significance 1e-3. With a fixed seed the test is
# deterministic; a correct sampler would exceed it only for one seed in a thousand.
CHI2_15DF_P001 = 37.70


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
  expected = counts.sum() * probs
  return float(((counts - expected) ** 2 / expected).sum())


def test_first_token_distribution_matches_softmax(tiny_hf_model):
  checkpoint, reference = tiny_hf_model("qwen2_vocab16")
  prompt = hf_models.random_prompts([5], vocab_size=16, pad_id=PAD, seed=2)[0]
  tokens, valid = hf_models.pad_left([prompt], PAD)
  logits = hf_models.hf_logits(reference, tokens, valid)[0, -1].astype(np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  rows = 4000
  assert rows * probs.min() >= 5  # every bin expects >= 5 draws, where the chi-square approximation holds

  vocab16_sampler = Sampler(load_hf_model(checkpoint), eos_ids=[SAMPLED_EOS], pad_id=PAD, max_prompt_len=16)
  out = vocab16_sampler.generate([prompt], SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=1.0), n=rows,
                                 seed=0)
  counts = np.bincount(out.tokens[:, 0], minlength=16)
  assert _chi_square(counts, probs) < CHI2_15DF_P001
  tempered = np.exp((logits - logits.max()) / 0.8)
  # Power: the same counts clearly reject T=0.8, so the bound above would catch a temperature bug.
  assert _chi_square(counts, tempered / tempered.sum()) > 2 * CHI2_15DF_P001


# --- filtering, bucketing, bad input -------------------------------------------------------------------------------------

def test_filter_logits_keeps_exactly_the_nucleus_and_the_top_k():
  probs = np.array([[0.1, 0.4, 0.05, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
  logits = jnp.asarray(np.log(probs), jnp.float32)

  def kept(top_k, top_p):
    return np.isfinite(np.asarray(filter_logits(logits, top_k, jnp.float32(top_p), use_top_p=top_p < 1)))

  # Nucleus for 0.65: 0.4 (mass before 0) + 0.3 (mass before 0.4 < 0.65); 0.15 has 0.7 before it, so it is cut.
  np.testing.assert_array_equal(kept(0, 0.65)[0], [False, True, False, True, False])
  np.testing.assert_array_equal(kept(0, 0.75)[0], [False, True, False, True, True])
  np.testing.assert_array_equal(kept(0, 0.3)[0], [False, True, False, False, False])  # the top token always stays
  np.testing.assert_array_equal(kept(2, 1.0)[0], [False, True, False, True, False])
  np.testing.assert_array_equal(kept(4, 0.65)[0], [False, True, False, True, False])  # both filters apply
  assert kept(0, 0.65)[1].all()  # ties at the threshold are kept together
  filtered = np.asarray(filter_logits(logits, 2, jnp.float32(1.0), use_top_p=False))
  np.testing.assert_array_equal(filtered[0, [1, 3]], np.asarray(logits)[0, [1, 3]])  # kept logits are unchanged


def test_first_argmax_is_numpys_argmax_including_ties():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, (200, 37)).astype(np.float32)  # few distinct values: most rows tie at their maximum
  x[:, -1] = -np.inf
  x[0] = -np.inf  # a row with no finite entry: index 0, as np.argmax
  np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


@pytest.mark.slow
def test_twenty_prompt_lengths_compile_one_program_per_bucket(qwen2):
  bucketed = Sampler(qwen2[0], eos_ids=[SAMPLED_EOS], pad_id=PAD, max_prompt_len=MAX_PROMPT)
  assert bucketed.prompt_buckets == (16, 32)
  lengths = np.unique(np.linspace(1, MAX_PROMPT, 20).round().astype(int))
  assert len(lengths) == 20
  config = SamplingConfig(max_new_tokens=2, temperature=0.0)  # a mode this file uses nowhere else
  before = prefill_slots._cache_size(), decode_segment._cache_size()
  for length in lengths:
    bucketed.generate(hf_models.random_prompts([length, length], vocab_size=96, seed=int(length)), config)
  # At most, not exactly: another test file may already have compiled this mode for the same tiny model. A decode
  # segment runs over 2 slots, or 1 once a row has finished: two programs per bucket at most.
  assert prefill_slots._cache_size() - before[0] <= len(bucketed.prompt_buckets)
  assert decode_segment._cache_size() - before[1] <= 2 * len(bucketed.prompt_buckets)


def test_prompt_longer_than_maximum_is_a_value_error_naming_it(sampler):
  prompts = [[2] * 4, [2] * (MAX_PROMPT + 1)]
  with pytest.raises(ValueError, match=f"prompt 1 has {MAX_PROMPT + 1} tokens"):
    sampler.generate(prompts, SamplingConfig(max_new_tokens=4))


# --- memory: chunked calls and the sampler's weight copy --------------------------------------------------------------

def test_a_kv_cache_budget_bounds_the_slots_and_gives_the_same_greedy_output(greedy_run, qwen2):
  greedy_sampler, whole, _, eos = greedy_run
  one_row = kv_cache_bytes_per_row(qwen2[0].cfg, 16 + MAX_NEW, mesh=None)  # PROMPTS are all in bucket 16
  assert one_row == 2 * qwen2[0].cfg.num_layers * qwen2[0].cfg.num_kv_heads * 26 * qwen2[0].cfg.head_dim * 4
  budgeted = Sampler(qwen2[0], eos_ids=[eos], pad_id=PAD, max_prompt_len=MAX_PROMPT, cache_budget_bytes=4 * one_row)
  got = budgeted.generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0))
  assert budgeted.last_stats["slots"] == 4  # 6 rows in 4 slots: two rows wait for a free slot
  assert budgeted.last_stats["prefills"] >= 2
  np.testing.assert_array_equal(got.tokens, whole.tokens)
  np.testing.assert_allclose(got.logprobs, whole.logprobs, atol=1e-5)


def test_chunk_rows_follows_the_budget_and_refuses_one_that_holds_no_row(qwen2):
  cfg = qwen2[0].cfg
  one_row = kv_cache_bytes_per_row(cfg, 100, mesh=None)
  assert chunk_rows(0, cfg, 100, mesh=None) is None
  assert chunk_rows(5 * one_row + 1, cfg, 100, mesh=None) == 5
  with pytest.raises(ValueError, match=r"rollout.kv_cache_gib: one row of 100 tokens needs [\d.]+ GiB"):
    chunk_rows(one_row - 1, cfg, 100, mesh=None)


def test_the_sampler_reads_weights_in_the_compute_dtype(qwen2):
  model = qwen2[0]
  bf16 = nnx.merge(*nnx.split(model))
  bf16.cfg = dataclasses.replace(model.cfg, compute_dtype="bfloat16")
  sampler = Sampler(bf16, eos_ids=[SAMPLED_EOS], pad_id=PAD, max_prompt_len=MAX_PROMPT)
  dtypes = {v.dtype for v in jax.tree.leaves(sampler.state)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  f32 = Sampler(model, eos_ids=[SAMPLED_EOS], pad_id=PAD, max_prompt_len=MAX_PROMPT)
  assert all(a is b for a, b in zip(jax.tree.leaves(f32.state), jax.tree.leaves(nnx.split(model)[1])))  # no copy


def test_a_sampler_without_its_own_copy_reads_the_params_as_they_are(qwen2):
  """The reference sampler (Self-Ref reflection, rare) keeps no second copy of the weights, even in bf16 compute."""
  model = nnx.merge(*nnx.split(qwen2[0]))
  model.cfg = dataclasses.replace(model.cfg, compute_dtype="bfloat16")
  sampler = Sampler(model, eos_ids=[SAMPLED_EOS], pad_id=PAD, max_prompt_len=MAX_PROMPT, copy_weights=False)
  assert all(a is b for a, b in zip(jax.tree.leaves(sampler.state), jax.tree.leaves(nnx.split(model)[1])))
  out = sampler.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=3, temperature=0.0))
  assert out.tokens.shape == (2, 3)


def test_the_blend_cache_write_equals_the_scatter():
  """TPU runs write each row's new K/V with a select over the cache (in place there); it must equal the scatter."""
  rng = np.random.default_rng(0)
  cache = jnp.asarray(rng.normal(size=(3, 2, 7, 4)), jnp.float32)
  new, positions = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32), jnp.asarray([0, 6, 3])
  scattered, blended = (np.asarray(write_rows(cache, new, positions, how)) for how in ("scatter", "blend"))
  np.testing.assert_array_equal(scattered, blended)
  expected = np.asarray(cache).copy()
  expected[np.arange(3), :, np.asarray(positions)] = np.asarray(new)
  np.testing.assert_array_equal(scattered, expected)


@pytest.mark.slow
def test_greedy_with_the_blend_cache_write_equals_the_scatter(greedy_run, qwen2):
  _, scattered, _, eos = greedy_run
  model = nnx.merge(*nnx.split(qwen2[0]))
  model.cfg = dataclasses.replace(model.cfg, cache_write="blend")
  blended = Sampler(model, eos_ids=[eos], pad_id=PAD, max_prompt_len=MAX_PROMPT, slots=4).generate(
      PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0))
  np.testing.assert_array_equal(blended.tokens, scattered.tokens)
  np.testing.assert_allclose(blended.logprobs, scattered.logprobs, atol=1e-5)
