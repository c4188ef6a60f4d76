"""Compiled train-step memory (memory_analysis, HLO copy ops) of the jaxseg tree at argv[1], pmap era or mesh era.

  python tools/step_memory.py .                 # this tree
  git worktree add /tmp/before 97b4580 && python tools/step_memory.py /tmp/before   # the pmap-era tree
"""
import os, sys, json
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
root = sys.argv[1]
sys.path.insert(0, root); sys.path.insert(0, os.path.join(root, 'benchmarks'))
import jax, numpy as np
import bench_train as bt
from jaxseg import state as state_lib, train
out = {}
for model, size, batch in (('unet-default', 64, 16), ('fcn8s', 128, 2)):
  _, k, _ = bt.model_kwargs(model)
  config = bt.jaxseg_config(model, 'float32', size, batch)
  spec = bt.stub_spec(k)
  images, labels = bt.make_batch(batch, size, k)
  n = jax.device_count()
  if hasattr(state_lib, 'build'):
    from jaxseg import sharding
    setup = state_lib.build(config, k, sharding.make_mesh())
    state = setup.abstract_state
    step = train.make_train_step(config, spec, setup, None)
    b = sharding.global_batch({'image': images, 'label': labels}, setup.mesh)
    compiled = step.lower(state, b).compile()
  else:
    from jaxseg import optim
    net = state_lib.build_model(config, k)
    lr = optim.create_learning_rate_schedule(config.optimizer, config.num_train_steps)
    tx = optim.create_optimizer(config.optimizer, lr)
    host = jax.eval_shape(lambda: state_lib.create_train_state(net, tx, jax.random.key(0), (size, size, 3)))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), host)
    rng = jax.ShapeDtypeStruct((n,), jax.random.key(0).dtype)
    p = train.make_train_step(config, spec, lr, None)
    b = {'image': images.reshape((n, -1) + images.shape[1:]), 'label': labels.reshape((n, -1) + labels.shape[1:])}
    compiled = p.lower(state, b, rng).compile()
  m = compiled.memory_analysis()
  state_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)) // (n if not hasattr(state_lib, 'build') else 1)
  hlo = compiled.as_text()
  out[model] = {'state_bytes_per_device': int(state_bytes), 'argument_bytes': m.argument_size_in_bytes,
                'output_bytes': m.output_size_in_bytes, 'alias_bytes': m.alias_size_in_bytes,
                'temp_bytes': m.temp_size_in_bytes,
                'copy_ops_in_hlo': hlo.count(' copy(') + hlo.count(' copy-start(')}
print(json.dumps(out))
