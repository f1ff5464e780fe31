"""Two processes (jax.distributed on localhost, one CPU device each), each loading
its own half of the batch, run the training step of one process with two devices."""
import os
import socket
import subprocess
import sys

import numpy as np

from configs import demo
from tests import golden

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import sys
import jax
pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                             process_id=pid, initialization_timeout=120)
import numpy as np
from cras_jax import train
from tests import tiny_step

pieces, devices, state, batch = tiny_step.setup()
assert devices.count == 2, devices.count
local = {k: v[devices.local_slice(8)] for k, v in batch.items()}
assert local["image"].shape[0] == 8 // jax.process_count()
dev_batch = devices.put_batch(local)
assert dev_batch["image"].shape == (8, 64, 64, 3)
step = devices.jit_train(train.make_train_step(pieces))
state, metrics = step(state, dev_batch)
tree = {"params": state.params, "batch_stats": state.batch_stats, "metrics": metrics}
flat = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0))
        for k, v in jax.tree_util.tree_leaves_with_path(tree)}
if jax.process_index() == 0:
  np.savez(out, **flat)
print("ok", jax.process_count(), devices.count)
'''


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices_per_process):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")


def test_two_processes_equal_one_process(tmp_path):
  single = tmp_path / "single.npz"
  out = subprocess.run([sys.executable, "-c", SCRIPT, "0", "1", "0", str(single)], cwd=ROOT,
                       env=_env(2), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  port = str(_free_port())
  multi = tmp_path / "multi.npz"
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), "2", port, str(multi)],
                            cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
    assert "ok 2 2" in o
  a, b = dict(np.load(single)), dict(np.load(multi))
  t = demo.get_config().train  # the rates the step used
  golden.assert_one_step_equal(b, a, t.lr_adapter, t.lr_disc)
