"""KD loss: exact special cases, a NumPy reference, chunked == unchunked, teacher never trained."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import validate
from idea_prune_jax.train.config import TrainConfig
from idea_prune_jax import settings
from idea_prune_jax import distill
from idea_prune_jax.data import batch as batch_lib
from idea_prune_jax.model import model as model_lib
from idea_prune_jax.train import optim
from idea_prune_jax.train import state as state_lib
from idea_prune_jax.train import step as step_lib
from idea_prune_jax.model.config import ModelConfig
from idea_prune_jax.prune.errors import PruneError

B, L, V = 2, 8, 64
STUDENT = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)
TEACHER = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=72)


@functools.cache
def _numpy_params(cfg, seed):
  # NumPy-filled rather than a flax init, which compiles for seconds on a busy CPU.
  shapes = nn.unbox(jax.eval_shape(functools.partial(model_lib.init_params, cfg),
                                   jax.random.key(0)))
  rng = np.random.default_rng(seed)
  fill = lambda path, s: (np.ones(s.shape, np.float32) if 'norm' in jax.tree_util.keystr(path)
                          else rng.normal(0.0, 0.1, s.shape).astype(np.float32))
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _params(cfg, seed):
  """Random params of the model's shapes, in fresh device buffers (tests donate them)."""
  return jax.tree.map(jnp.asarray, _numpy_params(cfg, seed))


def _batch(seed=0, pad_tail=2):
  tokens = np.random.default_rng(seed).integers(1, V, size=(B, L + 1)).astype(np.int32)
  weights = np.ones((B, L), np.float32)
  weights[0, L - pad_tail:] = 0.0  # a padded tail on the first sequence
  return batch_lib.make(jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]),
                        jnp.asarray(weights))


def _labels():
  batch = _batch()
  return batch['targets'], batch['weights']


def _logits(seed, shape=(B, L, V)):
  return jnp.asarray(3.0 * np.random.default_rng(seed).normal(size=shape), jnp.float32)


# Jitted once per test session: op-by-op dispatch compiles every small op and is slower here.
_kd_loss = jax.jit(distill.kd_loss)


def test_identical_student_and_teacher_has_exactly_zero_kl():
  logits, batch = _logits(0), _batch()
  loss, aux = _kd_loss(logits, logits, batch['targets'], batch['weights'], alpha=0.3, tau=2.0)
  assert float(aux['kl']) == 0.0
  np.testing.assert_allclose(loss, 0.7 * aux['ce'], rtol=1e-7)
  np.testing.assert_allclose(aux['teacher_ce'], aux['ce'], rtol=1e-7)


@pytest.mark.parametrize('tau', [1.0, 2.0])  # τ = 1 takes kd_loss's shared log-softmax path
def test_numpy_reference_with_temperature_and_padding(tau):
  s = np.array([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, -2.0, 0.0, 0.5]]])
  t = np.array([[[0.5, 1.0, 2.0, 0.0], [1.0, -1.0, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0]]])
  y = np.array([[1, 2, 0]])  # last position is padding: its (large) terms must not count
  alpha = 0.25

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  ce = -log_softmax(s)[0, [0, 1], y[0, :2]]
  teacher_ce = -log_softmax(t)[0, [0, 1], y[0, :2]]
  ls, lt = log_softmax(s / tau)[0, :2], log_softmax(t / tau)[0, :2]
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  expected = (1 - alpha) * ce.mean() + alpha * tau**2 * kl.mean()
  # A Python τ, bound statically, as a constant KDOptions.tau is.
  fn = jax.jit(functools.partial(distill.kd_loss, alpha=alpha, tau=tau))
  weights = jnp.asarray([[1.0, 1.0, 0.0]])
  loss, aux = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), weights)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(aux['ce'], ce.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux['kl'], kl.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux['teacher_ce'], teacher_ce.mean(), rtol=1e-6)
  assert float(aux['tokens']) == 2.0


def test_padding_positions_do_not_matter():
  s, t, batch = _logits(1), _logits(2), _batch(pad_tail=3)
  targets, weights = batch['targets'], batch['weights']
  noise = 100.0 * _logits(3)
  is_pad = (weights == 0)[..., None]
  loss, aux = _kd_loss(s, t, targets, weights, alpha=0.5, tau=1.5)
  loss2, aux2 = _kd_loss(s + noise * is_pad, t - noise * is_pad, targets, weights, alpha=0.5,
                                tau=1.5)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  assert float(aux['tokens']) == B * L - 3
  # and the gradient at padding positions is exactly zero
  g = jax.jit(jax.grad(lambda x: distill.kd_loss(x, t, targets, weights, alpha=0.5,
                                                  tau=1.5)[0]))(s)
  assert float(jnp.abs(g * is_pad).max()) == 0.0
  assert float(jnp.abs(g).max()) > 0.0


@functools.cache
def _kd_grads(chunk):
  """Jitted (loss, aux), (d/d student, d/d teacher) of kd_loss_fn; cached: tests share compiles."""
  fn = lambda p, batch, tp, alpha, tau: step_lib.kd_loss_fn(
      p, batch, tp, model=model_lib.Transformer(STUDENT),
      teacher_model=model_lib.Transformer(TEACHER), alpha=alpha, tau=tau, chunk=chunk)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 2), has_aux=True))


def test_alpha_zero_is_the_plain_lm_loss():
  params, batch = _params(STUDENT, 0), _batch()
  lm, count = jax.jit(step_lib.lm_loss, static_argnums=2)(params, batch,
                                                           model_lib.Transformer(STUDENT))
  (loss, aux), _ = _kd_grads(0)(params, batch, _params(TEACHER, 1), 0.0, 2.0)
  np.testing.assert_allclose(loss, lm, rtol=1e-6)
  assert float(aux['kl']) > 0.0 and float(aux['tokens']) == float(count) == B * L - 2


@pytest.mark.parametrize('chunk', [0, 4])
def test_no_gradient_reaches_the_teacher(chunk):
  (_, aux), (g_student, g_teacher) = _kd_grads(chunk)(
      _params(STUDENT, 0), _batch(), _params(TEACHER, 1), 0.9, 2.0)
  assert float(aux['kl']) > 0.0
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_teacher))
  assert all(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(g_student))


def test_no_gradient_reaches_teacher_logits():
  s, batch = _logits(0), _batch()
  g = jax.jit(jax.grad(lambda t: distill.kd_loss(s, t, batch['targets'], batch['weights'],
                                                 alpha=1.0, tau=1.0)[0]))(
      _logits(1))
  assert float(jnp.abs(g).max()) == 0.0


def test_chunked_equals_unchunked_through_the_models():
  args = (_params(STUDENT, 0), _batch(), _params(TEACHER, 1), 0.5, 2.0)
  (loss, aux), (grads, _) = _kd_grads(0)(*args)
  (loss_c, aux_c), (grads_c, _) = _kd_grads(4)(*args)
  np.testing.assert_allclose(loss_c, loss, atol=1e-5, rtol=0)
  for k in ('ce', 'kl', 'teacher_ce', 'tokens'):
    np.testing.assert_allclose(aux_c[k], aux[k], atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), grads_c, grads)


@functools.cache
def _hidden_grads(chunk):
  """(loss, aux), d/d (student hidden, student head) of chunked_kd_loss on fixed random inputs."""
  rng = np.random.default_rng(0)
  hs, ht, head_s, head_t = (jnp.asarray(rng.normal(size=s), jnp.float32)
                            for s in ((B, L, 16), (B, L, 16), (16, V), (16, V)))
  fn = lambda *a: distill.chunked_kd_loss(*a, *_labels(), alpha=0.5, tau=2.0, chunk=chunk)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(hs, head_s, ht, head_t)


@pytest.mark.parametrize('chunk', [1, 2, 4, L, 2 * L])
def test_chunked_equals_unchunked_on_hidden_states(chunk):
  (loss, aux), grads = _hidden_grads(0)
  (loss_c, aux_c), grads_c = _hidden_grads(chunk)
  np.testing.assert_allclose(loss_c, loss, atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux_c['kl'], aux['kl'], atol=1e-5, rtol=0)
  assert float(aux_c['tokens']) == float(aux['tokens'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), grads_c, grads)


def test_chunk_that_does_not_divide_the_sequence_is_one_clear_line():
  h, head = jnp.zeros((B, L, 4)), jnp.zeros((4, V))
  with pytest.raises(PruneError, match=r'^KD chunk=3: does not divide'):
    jax.jit(functools.partial(distill.chunked_kd_loss, alpha=0.5, tau=1.0, chunk=3))(
                                  h, head, h, head, jnp.ones((B, L), jnp.int32), jnp.ones((B, L)))


@pytest.mark.parametrize('kind', distill.SCHEDULES)
def test_kd_schedule_holds_its_start_moves_over_its_steps_and_holds_its_end(kind):
  value = jax.jit(distill.schedule(kind, 0.9, 0.5, begin=10, steps=20))
  v = np.array([float(value(s)) for s in range(40)])
  if kind == 'constant':
    np.testing.assert_allclose(v, 0.9)
    return
  np.testing.assert_allclose(v[:11], 0.9, rtol=1e-6)
  np.testing.assert_allclose(v[30:], 0.5, rtol=1e-6)
  assert np.all(np.diff(v) <= 1e-7) and v[20] == pytest.approx(0.7)
  quarter = {'linear': 0.8, 'cosine': 0.5 + 0.2 * (1 + np.cos(np.pi / 4))}[kind]
  assert v[15] == pytest.approx(quarter, rel=1e-6)
  # From 0 up (α switched on gradually): optax's cosine decay cannot start at 0; ours can.
  assert float(distill.schedule(kind, 0.0, 0.5, 0, 10)(10)) == pytest.approx(0.5)


@pytest.mark.parametrize('field,value', [('alpha_schedule', 'exp'), ('tau_schedule', 'step'),
                                         ('alpha_end', 1.5), ('tau_end', 0.0)])
def test_bad_kd_schedule_fields_are_refused_naming_them(field, value):
  c = settings.load('configs/tiny.py:test')
  c.distill.update(alpha=0.5, alpha_schedule='linear', tau_schedule='cosine')
  c.distill[field] = value
  with pytest.raises(settings.ConfigError, match=f'^config.distill.{field}='):
    validate(c, 1)


def _kd_train_step(chunk, lr=3e-3, donate=True):
  """train_step with KD from a wider teacher held in the state, jitted; (step, optimizer)."""
  schedule = optax.constant_schedule(lr)
  optimizer = optim.make_optimizer(TrainConfig(), schedule)
  kd = step_lib.KDOptions(model_lib.Transformer(TEACHER), alpha=0.5, tau=2.0, chunk=chunk)
  step = jax.jit(functools.partial(step_lib.train_step, model=model_lib.Transformer(STUDENT),
                                   optimizer=optimizer, schedule=schedule, kd=kd),
                 donate_argnums=(0,) if donate else ())
  return step, optimizer


def _kd_state(optimizer, teacher_params):
  params = _params(STUDENT, 0)
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params), teacher=teacher_params)


def test_kd_train_step_jits_with_a_wider_teacher_and_lowers_the_loss():
  batch = _batch()
  step, optimizer = _kd_train_step(chunk=4)
  state = _kd_state(optimizer, _params(TEACHER, 1))
  teacher_before = jax.tree.map(np.asarray, state.teacher)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert set(metrics) == {'loss', 'ce', 'kl', 'teacher_ce', 'grad_norm', 'lr', 'tokens', 'kd_alpha',
                          'kd_tau'}
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state.step) == 8 and float(metrics['lr']) == pytest.approx(3e-3)
  jax.tree.map(np.testing.assert_array_equal, state.teacher, teacher_before)  # never trained
  # One program: the teacher is an argument of the executable, not a constant folded into it.
  hlo = step.lower(state, batch).as_text()
  main = next(line for line in hlo.splitlines() if 'func.func public @main(' in line)
  assert main.count('%arg') == len(jax.tree.leaves((state, batch)))


def _dots_touching(jaxpr, size):
  """dot_generals in a jaxpr and all its sub-jaxprs with an operand dimension of `size`."""
  n = sum(eqn.primitive.name == 'dot_general' and any(size in v.aval.shape for v in eqn.invars)
          for eqn in jaxpr.eqns)
  return n + sum(_dots_touching(sub, size) for sub in jax.extend.core.subjaxprs(jaxpr))


def test_kd_train_step_runs_only_the_teachers_forward():
  # The teacher's FFN width (72) appears in no student shape: its matmuls are the teacher's
  # gate, up and down projections, once each (one scanned layer body). A teacher backward
  # would add their transposes.
  step, optimizer = _kd_train_step(chunk=0, donate=False)
  state = _kd_state(optimizer, _params(TEACHER, 1))
  jaxpr = jax.make_jaxpr(step)(state, _batch())
  assert _dots_touching(jaxpr.jaxpr, TEACHER.ffn_dim) == 3


def _student_step(state, batch, teacher_logits, *, optimizer):
  """The two-program alternative's second program: the KD step given the teacher's logits."""
  def loss_fn(params):
    logits = model_lib.Transformer(STUDENT).apply({'params': params}, batch['inputs'])
    return distill.kd_loss(logits, teacher_logits, batch['targets'], batch['weights'], alpha=0.5,
                           tau=2.0)
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state), loss


def test_fused_kd_step_equals_teacher_forward_then_student_step():
  batch, teacher = _batch(), _params(TEACHER, 1)
  fused, optimizer = _kd_train_step(chunk=0, donate=False)
  teacher_logits = jax.jit(model_lib.Transformer(TEACHER).apply)({'params': teacher},
                                                                 batch['inputs'])
  separate = jax.jit(functools.partial(_student_step, optimizer=optimizer))
  state = _kd_state(optimizer, teacher)
  new, metrics = fused(state, batch)
  ref, ref_loss = separate(state.replace(teacher=None), batch, teacher_logits)
  np.testing.assert_allclose(metrics['loss'], ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), new.params,
               ref.params)


def test_snapshot_survives_donation():
  params = _params(STUDENT, 0)
  teacher = distill.snapshot(params)
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=(0,))(params)
  jax.tree.map(lambda x: np.asarray(x), teacher)  # would raise on a deleted buffer
