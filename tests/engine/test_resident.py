"""Training data on the devices (engine/resident.py): `take` gives exactly the rows the host
would have read, laid out as the host's batch, on one device and split over several; the
"auto"/"true"/"false" rule."""

import jax
import numpy as np
import pytest

from cras_jax.base import errors
from cras_jax.engine import population, resident, sharding
from tests.conftest import run_on_cpu_devices

GB = 10**9


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, jax.numpy.bfloat16, np.float32])
def test_take_gives_the_host_rows_on_one_device(dtype):
  rng = np.random.default_rng(0)
  data = (rng.normal(size=(13, 4, 3)) * 40).astype(dtype)
  reads = []

  def read(lo, hi):
    reads.append((lo, hi))
    return data[lo:hi]

  devices = sharding.Devices()
  r = resident.Resident(devices, 13, (4, 3), dtype, read)
  assert reads == [(0, 13)]  # read once, by rows
  assert r.bytes_per_device == 13 * 12 * np.dtype(dtype).itemsize
  idx = rng.permutation(13)[:8]
  got = r.take(idx)
  assert got.dtype == data.dtype and got.sharding.is_equivalent_to(devices.batch, 3)
  np.testing.assert_array_equal(np.asarray(got), data[idx])
  members = np.stack([rng.permutation(13)[:4] for _ in range(3)])  # one order per member
  np.testing.assert_array_equal(np.asarray(r.take(members)), data[members])


SCRIPT = r"""
import numpy as np, jax
from cras_jax.engine import population, resident, sharding
rng = np.random.default_rng(0)
data = (rng.normal(size=(11, 5, 3)) * 40).astype(np.float16)  # 11 rows: padded to 12 on 2
for devices in (sharding.Devices(), population.PopulationDevices(1)):
  r = resident.Resident(devices, 11, (5, 3), np.float16, lambda lo, hi: data[lo:hi])
  assert r.bytes_per_device == 6 * 15 * 2
  for _ in range(5):
    idx = rng.permutation(11)[:8]
    got = r.take(idx)
    assert got.sharding.is_equivalent_to(devices.batch, 3)
    # every device holds its half of the batch, as put_batch lays it
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), data[idx][shard.index])
    np.testing.assert_array_equal(np.asarray(got), data[idx])
  members = np.stack([rng.permutation(11)[:4] for _ in range(3)])
  got = r.take(members)
  if isinstance(devices, population.PopulationDevices):
    assert got.sharding.is_equivalent_to(devices.member_batch, 3)
  np.testing.assert_array_equal(np.asarray(got), data[members])
print("ok", jax.device_count())
"""


def test_take_over_two_devices_gives_each_its_share_of_the_host_batch():
  assert "ok 2" in run_on_cpu_devices(2, SCRIPT, timeout=300)


def test_false_keeps_the_data_on_the_host_whatever_fits():
  d = resident.decide("false", "x", 1, 1, 100 * GB)
  assert not d.on_device and "data.on_device=false" in d.why


def test_true_puts_the_data_on_the_devices_unless_it_cannot_fit():
  assert resident.decide("true", "x", 10 * GB, 2 * GB, 16 * GB).on_device
  assert resident.decide("true", "x", 10 * GB, None, None).on_device  # nothing to compare with
  with pytest.raises(errors.UserValueError) as e:
    resident.decide("true", "the stored features", 15 * GB, 2 * GB, 16 * GB)
  msg = str(e.value)
  assert "data.on_device=true" in msg and "17 GB" in msg and "16 GB" in msg
  assert "data.on_device=false" in msg  # the fix


def test_auto_compares_data_and_step_with_the_margin_of_device_memory():
  limit = 16 * GB
  edge = int(resident.MARGIN * limit)
  assert resident.decide("auto", "x", edge - 3 * GB, 3 * GB, limit).on_device
  over = resident.decide("auto", "x", edge - 3 * GB + 1, 3 * GB, limit)
  assert not over.on_device and "80%" in over.why and "stay on the host" in over.why


def test_auto_keeps_the_data_on_the_host_where_nothing_can_be_compared():
  cpu = resident.decide("auto", "the training images", 1, 1, None)
  assert not cpu.on_device and "no memory limit" in cpu.why
  unknown = resident.decide("auto", "x", 1, None, 16 * GB)
  assert not unknown.on_device and "no memory analysis" in unknown.why


def test_an_unknown_setting_is_refused_naming_the_field():
  with pytest.raises(errors.UserValueError, match="data.on_device='yes'"):
    resident.decide("yes", "x", 1, 1, 1)


def test_the_cpu_reports_no_memory_limit():
  assert resident.device_limit(jax.devices()) is None
  assert resident.device_limit(population.PopulationDevices(1).mesh.devices.flat) is None
