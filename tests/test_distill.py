"""KD loss: exact special cases, a NumPy reference, chunked == unchunked, teacher never trained."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idea_prune_jax import config as config_lib
from idea_prune_jax import distill
from idea_prune_jax import model as model_lib
from idea_prune_jax import train as train_lib
from idea_prune_jax.config import ModelConfig

B, L, V = 2, 8, 64
STUDENT = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)
TEACHER = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=72)


def _params(cfg, seed):
  return nn.unbox(model_lib.init_params(cfg, jax.random.key(seed)))


def _batch(seed=0, pad_tail=2):
  tokens = np.random.default_rng(seed).integers(1, V, size=(B, L + 1)).astype(np.int32)
  targets = tokens[:, 1:].copy()
  targets[0, L - pad_tail:] = train_lib.PAD_ID  # a padded tail on the first sequence
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(targets)}


def _logits(seed, shape=(B, L, V)):
  return 3.0 * jax.random.normal(jax.random.key(seed), shape)


def test_identical_student_and_teacher_has_exactly_zero_kl():
  logits, targets = _logits(0), _batch()['targets']
  loss, aux = distill.kd_loss(logits, logits, targets, alpha=0.3, tau=2.0)
  assert float(aux['kl']) == 0.0
  np.testing.assert_allclose(loss, 0.7 * aux['ce'], rtol=1e-7)
  np.testing.assert_allclose(aux['teacher_ce'], aux['ce'], rtol=1e-7)


def test_numpy_reference_with_temperature_and_padding():
  s = np.array([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, -2.0, 0.0, 0.5]]])
  t = np.array([[[0.5, 1.0, 2.0, 0.0], [1.0, -1.0, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0]]])
  y = np.array([[1, 2, 0]])  # last position is padding: its (large) terms must not count
  alpha, tau = 0.25, 2.0

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  ce = -log_softmax(s)[0, [0, 1], y[0, :2]]
  teacher_ce = -log_softmax(t)[0, [0, 1], y[0, :2]]
  ls, lt = log_softmax(s / tau)[0, :2], log_softmax(t / tau)[0, :2]
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  expected = (1 - alpha) * ce.mean() + alpha * tau**2 * kl.mean()
  loss, aux = distill.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                              jnp.asarray(y), alpha=alpha, tau=tau)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(aux['ce'], ce.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux['kl'], kl.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux['teacher_ce'], teacher_ce.mean(), rtol=1e-6)
  assert float(aux['tokens']) == 2.0


def test_padding_positions_do_not_matter():
  s, t, targets = _logits(1), _logits(2), _batch(pad_tail=3)['targets']
  noise = 100.0 * _logits(3)
  is_pad = (targets == train_lib.PAD_ID)[..., None]
  loss, aux = distill.kd_loss(s, t, targets, alpha=0.5, tau=1.5)
  loss2, aux2 = distill.kd_loss(s + noise * is_pad, t - noise * is_pad, targets, alpha=0.5,
                                tau=1.5)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  assert float(aux['tokens']) == B * L - 3
  # and the gradient at padding positions is exactly zero
  g = jax.grad(lambda x: distill.kd_loss(x, t, targets, alpha=0.5, tau=1.5)[0])(s)
  assert float(jnp.abs(g * is_pad).max()) == 0.0
  assert float(jnp.abs(g).max()) > 0.0


def test_alpha_zero_is_the_plain_lm_loss():
  params, batch = _params(STUDENT, 0), _batch()
  teacher_params = _params(TEACHER, 1)
  model, teacher = model_lib.Transformer(STUDENT), model_lib.Transformer(TEACHER)
  lm, count = train_lib.lm_loss(params, batch, model)
  loss, aux = distill.kd_loss_fn(params, batch, teacher_params, model=model,
                                 teacher_model=teacher, alpha=0.0, tau=2.0)
  np.testing.assert_allclose(loss, lm, rtol=1e-6)
  assert float(aux['kl']) > 0.0 and float(aux['tokens']) == float(count)


def test_no_gradient_reaches_the_teacher():
  params, teacher_params, batch = _params(STUDENT, 0), _params(TEACHER, 1), _batch()
  model, teacher = model_lib.Transformer(STUDENT), model_lib.Transformer(TEACHER)
  for chunk in (0, 4):
    fn = functools.partial(distill.kd_loss_fn, model=model, teacher_model=teacher, alpha=0.9,
                           tau=2.0, chunk=chunk)
    g_teacher = jax.grad(lambda tp: fn(params, batch, tp)[0])(teacher_params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_teacher))
    g_student = jax.grad(lambda p: fn(p, batch, teacher_params)[0])(params)
    assert all(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(g_student))
  # also at the logits level
  g = jax.grad(lambda t: distill.kd_loss(_logits(0), t, batch['targets'], alpha=1.0, tau=1.0)[0])(
      _logits(1))
  assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize('tie', [True, False])
def test_chunked_equals_unchunked_loss_and_grads(tie):
  student = ModelConfig(**{**STUDENT.__dict__, 'tie_embeddings': tie})
  teacher = ModelConfig(**{**TEACHER.__dict__, 'tie_embeddings': tie})
  params, teacher_params, batch = _params(student, 0), _params(teacher, 1), _batch()
  model, teacher_model = model_lib.Transformer(student), model_lib.Transformer(teacher)

  def run(chunk):
    fn = functools.partial(distill.kd_loss_fn, model=model, teacher_model=teacher_model,
                           alpha=0.5, tau=2.0, chunk=chunk)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch, teacher_params)

  (loss, aux), grads = run(0)
  for chunk in (1, 2, 4, L, 2 * L):
    (loss_c, aux_c), grads_c = run(chunk)
    np.testing.assert_allclose(loss_c, loss, atol=1e-5, rtol=0)
    for k in ('ce', 'kl', 'teacher_ce', 'tokens'):
      np.testing.assert_allclose(aux_c[k], aux[k], atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), grads_c, grads)


def test_chunk_that_does_not_divide_the_sequence_is_one_clear_line():
  h, head = jnp.zeros((B, L, 4)), jnp.zeros((4, V))
  with pytest.raises(config_lib.ConfigError, match=r'^config.distill.chunk=3: does not divide'):
    jax.jit(functools.partial(distill.chunked_kd_loss, alpha=0.5, tau=1.0, chunk=3,
                              student_cfg=STUDENT, teacher_cfg=TEACHER))(
                                  h, head, h, head, jnp.ones((B, L), jnp.int32))


def test_distill_step_jits_with_a_wider_teacher_and_lowers_the_loss():
  params, teacher_params, batch = _params(STUDENT, 0), _params(TEACHER, 1), _batch()
  schedule = optax.constant_schedule(3e-3)
  train_cfg = config_lib.base().train
  optimizer = train_lib.make_optimizer(train_cfg, schedule)
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=optimizer.init(params))
  step = jax.jit(functools.partial(
      distill.distill_step, model=model_lib.Transformer(STUDENT),
      teacher_model=model_lib.Transformer(TEACHER), optimizer=optimizer, schedule=schedule,
      alpha=0.5, tau=2.0, chunk=4), donate_argnums=(0,))
  teacher_before = jax.tree.map(np.asarray, teacher_params)
  run = distill.bind_teacher(step, teacher_params)
  losses = []
  for _ in range(8):
    state, metrics = run(state, batch)
    losses.append(float(metrics['loss']))
  assert set(metrics) == {'loss', 'ce', 'kl', 'teacher_ce', 'grad_norm', 'lr', 'tokens'}
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state.step) == 8 and float(metrics['lr']) == pytest.approx(3e-3)
  jax.tree.map(np.testing.assert_array_equal, teacher_params, teacher_before)
  # the teacher is an argument of the executable, not a constant folded into it
  hlo = step.lower(state, batch, teacher_params).as_text()
  n_teacher = len(jax.tree.leaves(teacher_params))
  assert hlo.count('parameter(') >= n_teacher + len(jax.tree.leaves(state)) + 2


def test_snapshot_survives_donation():
  params = _params(STUDENT, 0)
  teacher = distill.snapshot(params)
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=(0,))(params)
  jax.tree.map(lambda x: np.asarray(x), teacher)  # would raise on a deleted buffer
