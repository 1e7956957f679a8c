"""Packed train rows (p2o_jax/rl/sequence_packing.py): the host-side layout each packing writes, and that the model
computes the same log-probs and the same update from it as from one unpadded row per sequence (the plain path)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from p2o_jax.models import attention
from p2o_jax.models.config import ModelConfig
from p2o_jax.models.decoder import Decoder, forward
from p2o_jax.rl.losses import PolicyLossConfig
from p2o_jax.rl.sequence_packing import (PACKINGS, PackedShape, attention_span, pack_sequences, packed_shape)
from p2o_jax.rl.train_step import StepConfig, make_logprob_fn, make_train_step

PAD = 0
TEMPERATURE = 0.7

# ---------------------------------------------------------------------------------------------------------------
# Host-side layout (NumPy only).
# ---------------------------------------------------------------------------------------------------------------

PROMPT_A, PROMPT_B = [11, 12, 13], [21, 22, 23, 24, 25]
HAND_LENGTHS = [1, 4, 2, 3, 5, 1]
HAND_MAX_NEW, HAND_MAX_LEN = 6, 32


def hand_rows():
  """6 rows: prompt A (3 tokens) for rows 0-2, prompt B (5 tokens) for rows 3-5; responses of 1, 4, 2, 3, 5, 1
  tokens, each row's response tokens distinct from every other token, garbage past the response."""
  prompt_ids = [list(PROMPT_A)] * 3 + [list(PROMPT_B)] * 3
  lengths = np.array(HAND_LENGTHS)
  mask = np.arange(HAND_MAX_NEW)[None, :] < lengths[:, None]
  tokens = np.where(mask, 100 + 10 * np.arange(6)[:, None] + np.arange(HAND_MAX_NEW)[None, :], 7).astype(np.int32)
  return prompt_ids, tokens, mask


def segment_parts(segments, packing):
  """(own segment, the other segment its queries see) as int arrays (packed rows, L)."""
  if packing == "rows":
    assert segments.dtype == np.bool_ and segments.ndim == 2
    own = segments.astype(np.int64)
    return own, own
  if packing == "sequences":
    assert np.issubdtype(segments.dtype, np.integer) and segments.ndim == 2
    return segments.astype(np.int64), segments.astype(np.int64)
  assert np.issubdtype(segments.dtype, np.integer) and segments.ndim == 3 and segments.shape[-1] == 2
  return segments[..., 0].astype(np.int64), segments[..., 1].astype(np.int64)


def check_layout(prompt_ids, tokens, mask, packed, shape, rows_per_cell, packing):
  """Every property of a packed layout that the model relies on, checked slot by slot. Returns ([(packed rows used,
  non-padding packed tokens) per cell], how many runs of rows were checked to share one prompt copy)."""
  n_rows = len(prompt_ids)
  lengths = mask.sum(axis=1)
  cells, rows, length, r = n_rows // rows_per_cell, shape.rows, shape.row_len, shape.response_len
  assert packed["tokens"].shape == (cells * rows, length) and packed["tokens"].dtype == np.int32
  assert packed["positions"].shape == (cells * rows, length) and packed["positions"].dtype == np.int32
  assert packed["segments"].shape[:2] == (cells * rows, length)
  for key in ("predictor", "response_tokens", "response_mask"):
    assert packed[key].shape == (n_rows, r), key
  np.testing.assert_array_equal(packed["response_mask"], np.arange(r)[None, :] < lengths[:, None])
  own_all, other_all = segment_parts(packed["segments"], packing)
  summary, shared_runs = [], 0
  for cell in range(cells):
    span = slice(cell * rows, (cell + 1) * rows)
    tok, pos, own, other = (x[span] for x in (packed["tokens"], packed["positions"], own_all, other_all))
    flat_tok = tok.reshape(-1)
    claimed = np.zeros(tok.shape, bool)  # slots some sequence (or shared prefix) holds
    own_segments = {}  # (packed row, id) -> the row whose own segment it is
    prefixes = {}  # (packed row, id) -> prompt of the shared prefix segment
    seen = {}  # row -> (its packed row, own segment id, the id it also sees)
    for i in range(cell * rows_per_cell, (cell + 1) * rows_per_cell):
      n, prompt = int(lengths[i]), list(prompt_ids[i])
      np.testing.assert_array_equal(packed["response_tokens"][i, :n], tokens[i, :n])
      assert (packed["response_tokens"][i, n:] == PAD).all()
      assert (packed["predictor"][i, n:] == 0).all()
      if n == 0:
        continue
      predictor = packed["predictor"][i, :n].astype(np.int64)
      np.testing.assert_array_equal(predictor, predictor[0] + np.arange(n))  # consecutive slots
      row, first = divmod(int(predictor[0]), length)
      assert (predictor // length == row).all(), "a sequence's predictors span packed rows"
      own_id, other_id = own[row, first], other[row, first]
      assert own_id > 0
      assert (own[row, predictor % length] == own_id).all() and (other[row, predictor % length] == other_id).all()
      assert (row, own_id) not in own_segments, f"rows {own_segments.get((row, own_id))} and {i} share a segment"
      assert (row, own_id) not in prefixes
      own_segments[(row, own_id)] = i
      seen[i] = (row, own_id, other_id)
      # The predicted token: the prompt's last for j = 0, then response token j - 1 at the next slot.
      assert flat_tok[predictor[0]] == prompt[-1]
      for j in range(n - 1):
        assert flat_tok[predictor[j] + 1] == tokens[i, j]
      np.testing.assert_array_equal(pos[row, predictor % length], len(prompt) - 1 + np.arange(n))
      # What each predicting query attends to (attention._visible): earlier slots of its row in its own segment or
      # the one it also sees. Exactly the prompt and the response so far, at positions 0, 1, ...
      for j in range(n):
        q = int(predictor[j]) % length
        keys = np.arange(q + 1)
        visible = keys[(own[row, :q + 1] > 0) & ((own[row, :q + 1] == own_id) | (own[row, :q + 1] == other_id))]
        np.testing.assert_array_equal(tok[row, visible], prompt + list(tokens[i, :j]), err_msg=f"row {i}, j {j}")
        np.testing.assert_array_equal(pos[row, visible], np.arange(len(prompt) + j), err_msg=f"row {i}, j {j}")
      # The row's own segment: contiguous, ending at its last predictor.
      mine = np.flatnonzero(own[row] == own_id)
      shared = other_id != own_id
      assert len(mine) == (n if shared else len(prompt) + n - 1)
      np.testing.assert_array_equal(mine, np.arange(mine[-1] - len(mine) + 1, mine[-1] + 1))
      assert mine[-1] == predictor[-1] % length
      claimed[row, mine] = True
      if shared:
        assert packing == "shared_prompts"
        prefix = np.flatnonzero(own[row] == other_id)
        assert len(prefix) == len(prompt) - 1
        np.testing.assert_array_equal(other[row, prefix], other_id)  # the prefix sees only itself
        assert prefixes.setdefault((row, other_id), tuple(prompt)) == tuple(prompt)
        claimed[row, prefix] = True
    for key in own_segments:
      assert key not in prefixes
    # Padding: segment 0 (False), the pad token, position 0.
    assert (own[~claimed] == 0).all() and (other[~claimed] == 0).all()
    assert (tok[~claimed] == PAD).all() and (pos[~claimed] == 0).all()
    used = int(claimed.any(axis=1).sum())
    if packing == "rows":  # one sequence per packed row, from its first slot
      assert len({row for row, _ in own_segments}) == len(own_segments)
      assert all(claimed[row, 0] for row, _ in own_segments)
      assert used == int((lengths[cell * rows_per_cell:(cell + 1) * rows_per_cell] > 0).sum())
    if packing != "shared_prompts":
      assert not prefixes and (own == other).all()
    else:
      shared_runs += _check_shared_runs(prompt_ids, lengths, cell, rows_per_cell, length, seen)
    summary.append((used, int(claimed.sum())))
  return summary, shared_runs


def _check_shared_runs(prompt_ids, lengths, cell, rows_per_cell, length, seen):
  """A run of consecutive rows of a cell with one prompt, whose shared unit (the prompt minus its last token once,
  then each row's last prompt token and response minus its last) fits a packed row, sees one copy of the prefix."""
  cell_rows = range(cell * rows_per_cell, (cell + 1) * rows_per_cell)
  runs = []
  for i in cell_rows:
    if lengths[i] == 0:
      continue
    if runs and prompt_ids[runs[-1][-1]] == prompt_ids[i]:
      runs[-1].append(i)
    else:
      runs.append([i])
  shared_runs = 0
  for run in runs:
    if len(run) < 2 or len(prompt_ids[run[0]]) - 1 + sum(int(lengths[i]) for i in run) > length:
      continue
    shared_runs += 1
    assert len({(seen[i][0], seen[i][2]) for i in run}) == 1, f"rows {run} do not share one prompt copy: " \
        f"{[seen[i] for i in run]}"
    assert all(seen[i][1] != seen[i][2] for i in run)
  return shared_runs


def pack(prompt_ids, tokens, mask, rows_per_cell, packing, max_len, span):
  shape = packed_shape(prompt_ids, mask, rows_per_cell, max_len, packing, span)
  return pack_sequences(prompt_ids, tokens, mask, PAD, rows_per_cell, shape, packing), shape


@pytest.mark.parametrize("span", [4.0, 1e9])
@pytest.mark.parametrize("rows_per_cell", [3, 2, 6])
@pytest.mark.parametrize("packing", PACKINGS)
def test_hand_made_layout(packing, rows_per_cell, span):
  """Two prompts each shared by 3 consecutive rows; cells of 3 (one prompt each), 2 (a prompt split over cells)
  and 6; a small and a large attention span (many short packed rows against few long ones)."""
  prompt_ids, tokens, mask = hand_rows()
  packed, shape = pack(prompt_ids, tokens, mask, rows_per_cell, packing, HAND_MAX_LEN, span)
  summary, shared_runs = check_layout(prompt_ids, tokens, mask, packed, shape, rows_per_cell, packing)
  assert shape.response_len >= max(HAND_LENGTHS)
  assert shape.row_len >= max(len(p) + n - 1 for p, n in zip(prompt_ids, HAND_LENGTHS))
  assert max(used for used, _ in summary) <= shape.rows
  stored = sum(count for _, count in summary)
  every_sequence = sum(len(p) + n - 1 for p, n in zip(prompt_ids, HAND_LENGTHS))  # 34
  if packing == "shared_prompts":
    assert shared_runs >= 1
    assert stored < every_sequence
  else:
    assert stored == every_sequence


def test_shared_prompts_store_each_prompt_once_per_group():
  """Cells of 3 rows, one prompt each: "shared_prompts" holds prompt A minus its last token once (2 tokens) and B's
  once (4), then n tokens per row (its last prompt token, its response minus the last): 2 + 7 + 4 + 9 = 22 tokens,
  against 13 + 21 = 34 with a prompt copy per row; and each prefix appears exactly once in its cell's packed row."""
  prompt_ids, tokens, mask = hand_rows()
  stored = {}
  for packing in PACKINGS:
    packed, shape = pack(prompt_ids, tokens, mask, 3, packing, HAND_MAX_LEN, 1e9)
    summary, _ = check_layout(prompt_ids, tokens, mask, packed, shape, 3, packing)
    stored[packing] = [count for _, count in summary]
    if packing == "shared_prompts":
      assert shape.row_len >= 13  # both groups fit one packed row
      assert [used for used, _ in summary] == [1, 1]
  assert stored == {"rows": [13, 21], "sequences": [13, 21], "shared_prompts": [9, 13]}
  packed, _ = pack(prompt_ids, tokens, mask, 3, "shared_prompts", HAND_MAX_LEN, 1e9)
  for cell, prompt in enumerate((PROMPT_A, PROMPT_B)):
    row = packed["tokens"][cell]
    assert sum(row[k:k + len(prompt) - 1].tolist() == prompt[:-1] for k in range(len(row))) == 1


def random_case(rs, rows, max_prompt, max_new, prompts_pool, allow_empty):
  """Rows whose prompts repeat in runs (a query's rollouts), random response lengths."""
  pool = [list(rs.randint(1, 40, rs.randint(1, max_prompt + 1))) for _ in range(prompts_pool)]
  prompt_ids = []
  while len(prompt_ids) < rows:
    prompt_ids += [pool[rs.randint(prompts_pool)]] * rs.randint(1, 4)
  prompt_ids = prompt_ids[:rows]
  lengths = rs.randint(0 if allow_empty else 1, max_new + 1, rows)
  mask = np.arange(max_new)[None, :] < lengths[:, None]
  tokens = np.where(mask, rs.randint(1, 40, (rows, max_new)), PAD).astype(np.int32)
  return prompt_ids, tokens, mask


@pytest.mark.parametrize("packing", PACKINGS)
def test_packed_shape_always_fits_and_a_smaller_one_raises(packing):
  """Random batches (runs of shared prompts, 1-11 token prompts, responses of 0-11 tokens, cells of 1-8 rows):
  packed_shape's shape always takes them and the layout checks hold; one packed row fewer than used, or rows one
  token shorter than the longest sequence, raise ValueError."""
  rs = np.random.RandomState(0)
  for _ in range(30):
    rows_per_cell = int(rs.choice([1, 2, 4, 8]))
    max_prompt, max_new = int(rs.randint(1, 12)), int(rs.randint(1, 12))
    prompt_ids, tokens, mask = random_case(rs, 8, max_prompt, max_new, 3, allow_empty=True)
    if not mask.any():
      mask[0, 0] = True
    packed, shape = pack(prompt_ids, tokens, mask, rows_per_cell, packing, max_prompt + max_new,
                         float(rs.choice([2.0, 16.0, 1e9])))
    summary, _ = check_layout(prompt_ids, tokens, mask, packed, shape, rows_per_cell, packing)
    used = max(u for u, _ in summary)
    assert 1 <= used <= shape.rows <= rows_per_cell
    with pytest.raises(ValueError):
      pack_sequences(prompt_ids, tokens, mask, PAD, rows_per_cell,
                     dataclasses.replace(shape, rows=used - 1), packing)
    lengths = mask.sum(axis=1)
    longest = max(len(p) + n - 1 for p, n in zip(prompt_ids, lengths) if n > 0)
    if longest > 1:
      with pytest.raises(ValueError):
        pack_sequences(prompt_ids, tokens, mask, PAD, rows_per_cell,
                       PackedShape(8 * rows_per_cell, longest - 1, shape.response_len), packing)


@pytest.mark.parametrize("packing", PACKINGS)
def test_non_prefix_mask_raises(packing):
  prompt_ids, tokens, mask = hand_rows()
  mask = mask.copy()
  mask[1, 2] = False  # row 1: tokens 0, 1 and 3 valid
  with pytest.raises(ValueError, match="prefix"):
    packed_shape(prompt_ids, mask, 3, HAND_MAX_LEN, packing, 16.0)
  with pytest.raises(ValueError, match="prefix"):
    pack_sequences(prompt_ids, tokens, mask, PAD, 3, PackedShape(6, 16, 8), packing)


# ---------------------------------------------------------------------------------------------------------------
# The model on packed rows against one unpadded row per sequence.
# ---------------------------------------------------------------------------------------------------------------

ROWS, MAX_PROMPT, MAX_NEW = 8, 7, 6


def tiny_config(**overrides):
  return ModelConfig(model_type="qwen2", vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, **overrides)


def tiny_model(seed=0, **overrides):
  return Decoder(tiny_config(**overrides), nnx.Rngs(seed))


def model_rows(seed=0):
  """8 rows: prompts in runs of 3, 3, 1, 1 (a query's rollouts; the second run crosses the middle, so cells of 4
  split it), prompts of 2-7 tokens, responses of 1-6."""
  rs = np.random.RandomState(seed)
  pool = [list(map(int, rs.randint(1, 40, n))) for n in (5, 2, 7, 4)]
  prompt_ids = [pool[0]] * 3 + [pool[1]] * 3 + [pool[2], pool[3]]
  lengths = np.array([3, 6, 1, 4, 2, 6, 5, 1])
  mask = np.arange(MAX_NEW)[None, :] < lengths[:, None]
  tokens = np.where(mask, rs.randint(1, 40, (ROWS, MAX_NEW)), PAD).astype(np.int32)
  return prompt_ids, tokens, mask


def reference_logprobs(model, prompt_ids, tokens, mask, width, temperature=TEMPERATURE):
  """(rows, width): each row alone, prompt + response without padding, through `forward`; log_softmax(logits / T)
  at position len(prompt) - 1 + j, of response token j. 0 past the response."""
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, seq: forward(nnx.merge(graphdef, p), seq, jnp.ones(seq.shape, bool))[0])  # eager: 20 s
  out = np.zeros((len(prompt_ids), width), np.float32)
  for i, prompt in enumerate(prompt_ids):
    n = int(mask[i].sum())
    logits = run(params, jnp.asarray([[*prompt, *tokens[i, :n]]], jnp.int32))
    logp = jax.nn.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + n] / temperature, axis=-1)
    out[i, :n] = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[i, :n, None]), axis=-1)[:, 0])
  return out


def as_micro_batches(packed, rows_per_cell):
  """One cell per micro-batch (no mesh): packed arrays (cells * n, L) -> (cells, n, L), response-layout arrays
  (rows, ...) -> (cells, rows_per_cell, ...)."""
  cells = packed["predictor"].shape[0] // rows_per_cell
  return {k: np.asarray(v).reshape(cells, -1, *np.shape(v)[1:]) for k, v in packed.items()}


@pytest.fixture(scope="module")
def reference():
  prompt_ids, tokens, mask = model_rows()
  return reference_logprobs(tiny_model(), prompt_ids, tokens, mask, MAX_NEW)


@pytest.mark.parametrize("packing, impl", [("rows", "plain"), ("sequences", "plain"), ("shared_prompts", "plain"),
                                           ("sequences", "chunked"), ("shared_prompts", "chunked")])
def test_logprobs_equal_the_plain_path(packing, impl, reference, monkeypatch):
  """make_logprob_fn on packed rows (cells of 4: two micro-batches) against each sequence alone through `forward`.
  "chunked" runs with CHUNK = 4, so its scan really splits the packed rows."""
  monkeypatch.setattr(attention, "CHUNK", 4)
  prompt_ids, tokens, mask = model_rows()
  rows_per_cell = 4
  cfg = tiny_config(attention=impl)
  packed, shape = pack(prompt_ids, tokens, mask, rows_per_cell, packing, MAX_PROMPT + MAX_NEW, attention_span(cfg))
  assert shape.row_len > attention.CHUNK
  graphdef, params = nnx.split(Decoder(cfg, nnx.Rngs(0)))
  got = np.asarray(make_logprob_fn(graphdef, TEMPERATURE)(params, as_micro_batches(packed, rows_per_cell)))
  got = got.reshape(ROWS, -1)
  want = np.zeros(got.shape, np.float32)
  want[:, :reference.shape[1]] = reference[:, :got.shape[1]]
  response_mask = packed["response_mask"]
  assert response_mask.sum() == mask.sum()
  np.testing.assert_allclose(np.where(response_mask, got, 0.0), np.where(response_mask, want, 0.0), atol=1e-5, rtol=0)
  assert np.isfinite(got).all()


def sgd_delta(packed, rows_per_cell, advantages, old_logp, aggregation="token-mean"):
  """One train step of SGD(1.0) from the tiny model's params on `packed` (one cell per micro-batch): the parameter
  delta and the step's metrics."""
  graphdef, params = nnx.split(tiny_model())
  before = jax.tree.map(np.array, params)
  mask = packed["response_mask"]
  minibatch = as_micro_batches({**packed, "advantages": advantages, "token_weights": np.ones(mask.shape, np.float32),
                                "old_logp": old_logp[:, :mask.shape[1]]}, rows_per_cell)
  optimizer = optax.apply_if_finite(optax.sgd(1.0), 10)
  step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(aggregation=aggregation), TEMPERATURE))
  new_params, _, metrics = step(params, optimizer.init(params), minibatch)
  delta = jax.tree.map(lambda new, old: np.asarray(new) - old, new_params, before)
  return delta, jax.device_get(metrics)


@pytest.mark.slow  # ~3 s per step compile, 5 steps
def test_gradients_equal_across_layouts(reference):
  """From the same params and batch (old log-probs the plain path's, perturbed so some ratios clip), "rows",
  "sequences" and "shared_prompts" make the same SGD update and report the same loss and gradient norm; and two
  cells of 4 rows (two micro-batches) make the update of one cell of all 8 under token-mean aggregation."""
  prompt_ids, tokens, mask = model_rows()
  rs = np.random.RandomState(1)
  advantages = rs.randn(ROWS).astype(np.float32)
  old_logp = np.where(mask, reference + rs.normal(0, 0.3, reference.shape), 0.0).astype(np.float32)
  span = attention_span(tiny_config())
  results = {}
  for packing in PACKINGS:
    for rows_per_cell in (ROWS, ROWS // 2):
      if rows_per_cell != ROWS and packing == "sequences":
        continue
      packed, _ = pack(prompt_ids, tokens, mask, rows_per_cell, packing, MAX_PROMPT + MAX_NEW, span)
      results[packing, rows_per_cell] = sgd_delta(packed, rows_per_cell, advantages, old_logp)
  base_delta, base_metrics = results["rows", ROWS]
  assert 0.05 < float(base_metrics["clip_fraction"]) < 0.95
  assert float(base_metrics["update_skipped"]) == 0.0
  leaves = jax.tree.leaves(base_delta)
  assert max(float(np.abs(x).max()) for x in leaves) > 1e-4  # the update is not trivially zero
  for key, (delta, metrics) in results.items():
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(key)), delta,
                 base_delta)
    for name in ("loss", "grad_norm", "clip_fraction", "ratio_mean", "entropy", "loss_denominator"):
      np.testing.assert_allclose(metrics[name], base_metrics[name], rtol=1e-5, atol=1e-7, err_msg=f"{key} {name}")
