"""Every attention implementation against "plain" (p2o_jax/models/attention.py): outputs and gradients, on CPU.

- "chunked" runs as it would anywhere (a small chunk, so every case spans several chunks, t not always a multiple).
- "splash" runs its Pallas TPU kernel in interpret mode; that it also compiles for real TPUs (and how little memory it
  takes there) is checked by compiling for TPU topologies described by libtpu, nothing executed.
- "cudnn" can only be lowered on a GPU; its "xla" twin (the same jax.nn.dot_product_attention call with
  implementation="xla", the same compaction of valid tokens) is what runs here.

Queries with no key to attend to (padding slots) must come out finite; their values are not compared except for
"chunked", which does plain's arithmetic on them too. Run as a script (with 4 host devices), this module is the
subprocess of `test_splash_under_a_four_device_mesh_matches_plain`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from p2o_jax import sharding
from p2o_jax.models import attention as A
from p2o_jax.models import decoder
from p2o_jax.models.config import ModelConfig

ATOL = 1e-5
SCALE = 0.25
SMALL_CHUNK = 8

IMPLS = {
    "chunked": functools.partial(A.chunked_attention, chunk=SMALL_CHUNK),
    "splash": functools.partial(A.splash_attention, interpret=True),
    "cudnn_as_xla": functools.partial(A.cudnn_attention, implementation="xla"),
}


@dataclasses.dataclass(frozen=True)
class Case:
  t: int
  s: int
  h: int
  kv: int
  segments: np.ndarray  # (b, s)
  q_offset: int = 0
  traced_offset: bool = False  # q_offset passed as a traced int32 (decode)
  d: int = 16


def _bool_rows(s: int) -> np.ndarray:
  """A left-padded row, a right-padded row, a fully padded row."""
  valid = np.zeros((3, s), bool)
  valid[0, 5:] = True
  valid[1, :s - 7] = True
  return valid


def _packed_rows(s: int) -> np.ndarray:
  """Several segments per row with padding between and after them (packed SFT), a left-padded int row."""
  rows = np.zeros((3, s), np.int32)
  rows[0, :10], rows[0, 10:25], rows[0, 25:s - 4] = 1, 2, 3
  rows[1, 6:] = 1
  rows[2, :3], rows[2, 3:20], rows[2, 22:s - 2] = 4, 7, 2
  return rows


CASES = {
    "gqa_left_right_and_fully_padded": Case(37, 37, 4, 2, _bool_rows(37)),
    "gqa_packed_segments": Case(37, 37, 4, 2, _packed_rows(37)),
    "mqa_padded": Case(37, 37, 4, 1, _bool_rows(37)),
    "t_a_multiple_of_the_chunk": Case(32, 32, 4, 2, _packed_rows(32)),
    "many_groups": Case(19, 19, 8, 2, _bool_rows(19)),
    "queries_after_a_cached_prefix": Case(20, 40, 4, 2, _packed_rows(40), q_offset=13, traced_offset=True),
    "decode_step": Case(1, 40, 4, 2, _bool_rows(40), q_offset=25, traced_offset=True),
}


def _inputs(case: Case, seed: int = 0):
  r = np.random.default_rng(seed)
  b = case.segments.shape[0]
  q = r.normal(size=(b, case.t, case.h, case.d))
  k, v = r.normal(size=(2, b, case.kv, case.s, case.d))
  weights = r.normal(size=(b, case.t, case.h, case.d))
  return [jnp.asarray(x, jnp.float32) for x in (q, k, v, weights)]


def _seen(case: Case) -> np.ndarray:
  """(b, t): the queries that have at least one key to attend to."""
  return np.asarray(A.visible(jnp.asarray(case.segments), case.q_offset, case.t).any(-1))


@functools.lru_cache(maxsize=None)
def _plain_reference(case_name: str):
  case = CASES[case_name]
  return _output_and_grads(A.plain_attention, case, *_inputs(case))


def _output_and_grads(impl, case: Case, q, k, v, weights):
  """impl's output and the gradients w.r.t. q, k, v of sum(output * weights) over the queries that see a key."""
  seen = jnp.asarray(_seen(case))[:, :, None, None]
  segments = jnp.asarray(case.segments)

  def run(q, k, v, q_offset):
    q_offset = q_offset if case.traced_offset else case.q_offset
    out = impl(q, k, v, segments, q_offset, SCALE)
    loss = lambda q, k, v: jnp.sum(jnp.where(seen, impl(q, k, v, segments, q_offset, SCALE) * weights, 0.0))
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return jax.jit(run)(q, k, v, jnp.int32(case.q_offset))


@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("impl_name", sorted(IMPLS))
def test_matches_plain_forward_and_gradients(impl_name, case_name):
  case = CASES[case_name]
  q, k, v, weights = _inputs(case)
  out, grads = _output_and_grads(IMPLS[impl_name], case, q, k, v, weights)
  ref_out, ref_grads = _plain_reference(case_name)
  assert out.shape == ref_out.shape and out.dtype == jnp.float32
  assert bool(jnp.isfinite(out).all())  # padding queries included
  seen = _seen(case)
  np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref_out)[seen], atol=ATOL, rtol=0)
  if impl_name == "chunked":  # plain's arithmetic on every query, fully masked ones included
    np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=0)
  for name, got, expected in zip("qkv", grads, ref_grads, strict=True):
    assert bool(jnp.isfinite(got).all()), name
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=f"d/d{name}")


def test_every_case_has_a_fully_padded_or_unseen_query_and_several_chunks():
  """The cases exercise what they claim: masked queries, and (but for decode) more than one chunk."""
  for name, case in CASES.items():
    if name != "decode_step":
      assert case.t > SMALL_CHUNK and not _seen(case).all(), name
  assert CASES["gqa_left_right_and_fully_padded"].t % SMALL_CHUNK and not CASES["t_a_multiple_of_the_chunk"].t % 8


def test_chunked_is_plain_itself_up_to_one_chunk():
  case = CASES["gqa_packed_segments"]
  q, k, v, _ = _inputs(case)
  segments = jnp.asarray(case.segments)
  np.testing.assert_array_equal(A.attend(q, k, v, segments, 0, scale=SCALE, impl="chunked"),
                                A.attend(q, k, v, segments, 0, scale=SCALE, impl="plain"))


def test_repeating_kv_heads_keeps_each_query_head_on_its_keys():
  """What splash does when "tensor" divides the query heads but not the kv heads (attention.splash_layout)."""
  case = CASES["gqa_packed_segments"]
  q, k, v, _ = _inputs(case)
  segments = jnp.asarray(case.segments)
  np.testing.assert_allclose(A.plain_attention(q, jnp.repeat(k, 2, 1), jnp.repeat(v, 2, 1), segments, 0, SCALE),
                             A.plain_attention(q, k, v, segments, 0, SCALE), atol=1e-6, rtol=0)


def test_splash_layout_splits_batch_and_heads_where_they_divide():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  assert A.splash_layout(mesh, 4, 8, 2) == (P(("data", "fsdp"), "tensor", None, None), P(("data", "fsdp"), None), 1)
  assert A.splash_layout(mesh, 2, 8, 1) == (P("data", "tensor", None, None), P("data", None), 2)  # MQA on tensor=2
  assert A.splash_layout(mesh, 3, 6, 3) == (P(None, "tensor", None, None), P(None, None), 2)  # odd batch: replicated
  wide = jax.sharding.AbstractMesh((1, 1, 4), sharding.MESH_AXES)
  assert A.splash_layout(wide, 4, 8, 2) == (P(None, "tensor", None, None), P(None, None), 2)
  assert A.splash_layout(wide, 4, 6, 2)[0] == P(None, None, None, None)  # 4 does not divide 6 query heads


def test_splash_under_an_ambient_one_device_mesh_matches_plain():
  """The shard_map path (specs from the ambient mesh), on the one CPU device."""
  case = CASES["gqa_packed_segments"]
  q, k, v, weights = _inputs(case)
  with jax.set_mesh(sharding.make_mesh({"data": -1})):
    out, grads = _output_and_grads(IMPLS["splash"], case, q, k, v, weights)
  ref_out, ref_grads = _plain_reference("gqa_packed_segments")
  seen = _seen(case)
  np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref_out)[seen], atol=ATOL, rtol=0)
  for got, expected in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def _four_device_check() -> dict:
  """(subprocess, 4 host devices) splash under meshes that split the batch, the heads, and repeat the kv heads."""
  case = CASES["gqa_packed_segments"]
  segments = np.concatenate([case.segments, case.segments[::-1]])  # 6 rows: the batch splits over 2
  case = dataclasses.replace(case, segments=segments, h=8, kv=2)
  q, k, v, weights = _inputs(case)
  ref_out, ref_grads = _output_and_grads(A.plain_attention, case, q, k, v, weights)
  seen = _seen(case)
  diffs = {}
  for shape in [(2, 1, 2), (1, 1, 4), (1, 2, 1)]:
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])
    with jax.set_mesh(mesh):
      out, grads = _output_and_grads(IMPLS["splash"], case, q, k, v, weights)
    diffs[str(shape)] = max([float(np.abs(np.asarray(out) - np.asarray(ref_out))[seen].max())]
                            + [float(jnp.abs(g - e).max()) for g, e in zip(grads, ref_grads)])
  return {"devices": jax.device_count(), "max_diff": diffs}


@pytest.mark.slow
def test_splash_under_a_four_device_mesh_matches_plain():
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH")]))}
  proc = subprocess.run([sys.executable, __file__], env=env, cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4
  for shape, diff in result["max_diff"].items():
    assert diff <= ATOL, (shape, diff)


def _grad_temp_bytes(impl, b, t, h, kv, d, dtype=jnp.float32) -> int:
  """Temporary bytes XLA:CPU allocates for the gradient of sum(attention) (compiled, not run)."""
  loss = lambda q, k, v, segments: impl(q, k, v, segments, 0, d ** -0.5).astype(jnp.float32).sum()
  args = (jax.ShapeDtypeStruct((b, t, h, d), dtype), jax.ShapeDtypeStruct((b, kv, t, d), dtype),
          jax.ShapeDtypeStruct((b, kv, t, d), dtype), jax.ShapeDtypeStruct((b, t), jnp.bool_))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_bounds_the_gradients_memory():
  b, t, h, kv, d = 2, 2048, 4, 2, 64
  full_scores = b * h * t * t * 4  # one f32 (t, s) matrix per head: 128 MiB
  plain = _grad_temp_bytes(A.plain_attention, b, t, h, kv, d)
  chunked = _grad_temp_bytes(A.chunked_attention, b, t, h, kv, d)  # CHUNK = 512: a quarter of t
  # Measured with JAX 0.10.2: plain 388 MiB, chunked 106 MiB (about 3 chunks' scores).
  assert plain >= 2 * full_scores
  assert chunked * 3 < plain and chunked < full_scores
  assert chunked <= 4 * b * h * A.CHUNK * t * 4


# ---- splash compiled for real TPU topologies (libtpu describes them; nothing runs) ----------------------------------

def _tpu_devices(topology: str, chip_config: str, host_bounds: tuple[int, int, int]) -> np.ndarray:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no TPU is opened
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                        chips_per_host_bounds=host_bounds, num_slices=1)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"libtpu cannot describe TPU topology {topology} here ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); pip install 'jax[tpu]' to compile for TPUs on CPU "
                "(and run with JAX_PLATFORMS=cpu)")
  return np.asarray(desc.devices)


def _tpu_grad(devices: np.ndarray, mesh_shape, impl: str, b=4, t=2048, h=8, kv=2, d=128):
  mesh = jax.sharding.Mesh(devices.reshape(mesh_shape), sharding.MESH_AXES)
  batch = NamedSharding(mesh, sharding.logical_to_spec(("batch",), (b,), mesh))
  args = (jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=batch),
          jax.ShapeDtypeStruct((b, kv, t, d), jnp.bfloat16, sharding=batch),
          jax.ShapeDtypeStruct((b, kv, t, d), jnp.bfloat16, sharding=batch),
          jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=batch))
  loss = lambda q, k, v, segments: A.ATTENTIONS[impl](q, k, v, segments, 0, d ** -0.5).astype(jnp.float32).sum()
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  return compiled, b * h * t * t * 4 // devices.size  # plain's f32 (t, s) scores per device


@pytest.mark.slow
def test_splash_compiles_for_a_v5e_chip_within_a_fraction_of_plains_memory():
  devices = _tpu_devices("v5e:1x1", "default", (1, 1, 1))
  compiled, full_scores = _tpu_grad(devices, (1, 1, 1), "splash")
  text = compiled.as_text()
  assert "splash_mha_fwd" in text and "splash_mha_dq" in text and "splash_mha_dkv" in text  # forward and backward
  # Measured: 1.7 MiB of temporaries, against 512 MiB for one (t, s) f32 score matrix per head (plain: 1 GiB).
  assert compiled.memory_analysis().temp_size_in_bytes * 50 < full_scores


@pytest.mark.slow  # ~20 s each on 2 busy cores
@pytest.mark.parametrize("mesh_shape", [(2, 2, 1), (1, 1, 4)])  # batch over data x fsdp; heads over tensor (kv x2)
def test_splash_compiles_for_four_v5p_chips_per_device(mesh_shape):
  devices = _tpu_devices("v5p:2x2x1", "megacore", (2, 2, 1))
  compiled, full_scores = _tpu_grad(devices, mesh_shape, "splash")
  text = compiled.as_text()
  assert "splash_mha_fwd" in text and "splash_mha_dkv" in text
  # Measured: 9.5 MiB (batch split) and 23 MiB (heads split) against 128 MiB of f32 scores per device.
  assert compiled.memory_analysis().temp_size_in_bytes * 4 < full_scores


# ---- end to end: the decoder with each implementation ---------------------------------------------------------------

def _tiny_decoder(attention: str) -> decoder.Decoder:
  cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
                    attention=attention)
  return decoder.Decoder(cfg, nnx.Rngs(0))


def _decoder_batch():
  r = np.random.default_rng(1)
  lengths = [40, 25, 6, 0]  # left-padded to 40; the last row all padding
  valid = np.arange(40)[None, :] >= 40 - np.asarray(lengths)[:, None]
  tokens = np.where(valid, r.integers(1, 64, size=valid.shape), 0).astype(np.int32)
  return tokens, valid


@functools.lru_cache(maxsize=None)
def _plain_decoder_outputs():
  tokens, valid = _decoder_batch()
  return _decoder_outputs(_tiny_decoder("plain"), jnp.asarray(tokens), jnp.asarray(valid))


def _decoder_outputs(model: decoder.Decoder, tokens, valid):
  """Teacher-forced logits; and a cached prefill of all but the last 4 slots plus one decode step's logits."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens, valid):
    model = nnx.merge(graphdef, state)
    logits = decoder.forward(model, tokens, valid)
    b, t = tokens.shape
    prompt = t - 4
    positions = decoder.positions_from_mask(valid)
    cache = decoder.init_cache(model.cfg, b, t)
    keys = valid.at[:, prompt + 1:].set(False)
    _, cache = model(tokens[:, :prompt], positions[:, :prompt], keys, cache, 0)
    step, _ = model(tokens[:, prompt:prompt + 1], positions[:, prompt:prompt + 1], keys, cache,
                    jnp.int32(prompt))
    return logits, step[:, 0]

  return run(state, tokens, valid)


@pytest.mark.parametrize("attention", [pytest.param("chunked", marks=pytest.mark.slow),
                                       pytest.param("splash", marks=pytest.mark.slow), "cudnn"])
def test_decoder_logits_match_plain(monkeypatch, attention):
  monkeypatch.setattr(A, "CHUNK", SMALL_CHUNK)
  monkeypatch.setitem(A.ATTENTIONS, "splash", functools.partial(A.splash_attention, interpret=True))
  monkeypatch.setitem(A.ATTENTIONS, "cudnn", functools.partial(A.cudnn_attention, implementation="xla"))
  tokens, valid = _decoder_batch()
  logits, step = _decoder_outputs(_tiny_decoder(attention), jnp.asarray(tokens), jnp.asarray(valid))
  ref_logits, ref_step = _plain_decoder_outputs()
  assert bool(jnp.isfinite(logits).all())
  np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref_logits)[valid], atol=ATOL, rtol=0)
  stepped = valid[:, -4]  # rows whose decoded token is a real one
  np.testing.assert_allclose(np.asarray(step)[stepped], np.asarray(ref_step)[stepped], atol=ATOL, rtol=0)


def test_auto_is_the_memory_efficient_implementation_of_each_platform():
  assert A.resolve_attention("auto", "tpu") == "splash"
  assert A.resolve_attention("auto", "gpu") == "cudnn"
  assert A.resolve_attention("auto", "cpu") == "chunked"
  assert A.resolve_attention("plain", "tpu") == "plain"
  assert set(A.ATTENTION_CHOICES) == {"auto", "plain", "chunked", "splash", "cudnn"}


if __name__ == "__main__":
  print(json.dumps(_four_device_check()))
