import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from recalign.tasks import packing

LENGTHS = {"inputs": 32, "targets": 8}


def stream(n, seed=0, max_in=40, max_tg=10):
  """Examples with skewed lengths (many short, some over the caps), tokens = distinct ids."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    li = int(min(max_in, rng.geometric(0.08)))
    lt = int(min(max_tg, rng.integers(1, max_tg + 1)))
    out.append({"inputs": np.arange(1, li + 1, dtype=np.int32) + 1000 * k,
                "targets": np.arange(1, lt + 1, dtype=np.int32) + 1000 * k + 500})
  return out


def segments(batch):
  """(inputs, targets) of every packed example, checking the per-segment features on the way."""
  out = []
  for r in range(len(batch["encoder_input_tokens"])):
    for s in range(1, int(batch["encoder_segment_ids"][r].max(initial=0)) + 1):
      ei, di = batch["encoder_segment_ids"][r] == s, batch["decoder_segment_ids"][r] == s
      inputs, targets = batch["encoder_input_tokens"][r][ei], batch["decoder_target_tokens"][r][di]
      np.testing.assert_array_equal(batch["encoder_positions"][r][ei], np.arange(ei.sum()))
      np.testing.assert_array_equal(batch["decoder_positions"][r][di], np.arange(di.sum()))
      np.testing.assert_array_equal(batch["decoder_input_tokens"][r][di], np.r_[0, targets[:-1]])
      np.testing.assert_array_equal(batch["decoder_loss_weights"][r][di], 1)
      assert np.all(np.diff(np.flatnonzero(ei)) == 1)  # one contiguous run per segment
      out.append((tuple(inputs), tuple(targets)))
    # nothing outside the segments
    assert not batch["encoder_input_tokens"][r][batch["encoder_segment_ids"][r] == 0].any()
    assert not batch["decoder_loss_weights"][r][batch["decoder_segment_ids"][r] == 0].any()
  return out


@pytest.mark.parametrize("lookahead", [1, 3, 4])
def test_every_example_once_cut_to_lengths_and_delayed_at_most_one_batch(lookahead):
  exs = stream(300)
  batches = list(packing.Packer(iter(exs), LENGTHS, rows=4, lookahead=lookahead))
  seen = {}
  for b, batch in enumerate(batches):
    assert batch["encoder_input_tokens"].shape == (4, 32) and batch["decoder_target_tokens"].shape == (4, 8)
    for inputs, targets in segments(batch):
      seen[(inputs, targets)] = b
  expected = [(tuple(e["inputs"][:32]), tuple(e["targets"][:8])) for e in exs]
  assert sorted(seen) == sorted(expected) and len(seen) == len(exs)
  # the stream order is kept up to one batch: example k is never packed after a later example's batch + 1
  order = [seen[x] for x in expected]
  assert all(order[k] <= min(order[k:]) + 1 for k in range(len(order)))


def test_same_features_as_seqio_packing_when_nothing_shares_a_row():
  # Every example is longer than half a row, so next-fit (seqio) and first-fit give the same rows.
  exs = [{"inputs": np.arange(1, 18 + k, dtype=np.int32), "targets": np.arange(2, 7 + k % 3, dtype=np.int32)}
         for k in range(8)]
  ds = tf.data.Dataset.from_generator(lambda: iter(exs), output_signature={
      "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})
  ref = list(seqio.EncDecFeatureConverter(pack=True)(ds, LENGTHS).batch(4).as_numpy_iterator())
  ours = list(packing.Packer(iter(exs), LENGTHS, rows=4, lookahead=1))
  assert len(ours) == len(ref) == 2
  for a, b in zip(ours, ref):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_denser_than_next_fit():
  exs = stream(2000, seed=1, max_in=32, max_tg=8)  # seqio validates lengths instead of cutting
  ds = tf.data.Dataset.from_generator(lambda: iter(exs), output_signature={
      "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})
  next_fit = [packing.density(b) for b in
              seqio.EncDecFeatureConverter(pack=True)(ds, LENGTHS).batch(8, drop_remainder=True).as_numpy_iterator()]
  first_fit = [packing.density(b) for b in packing.Packer(iter(exs), LENGTHS, rows=8)][:-1]
  assert np.mean(first_fit) > np.mean(next_fit) + 0.1, (np.mean(first_fit), np.mean(next_fit))
  # and it uses correspondingly fewer rows for the same examples
  assert len(first_fit) < 0.9 * len(next_fit)


def test_deterministic_and_rejects_bad_lookahead():
  a = [b["encoder_input_tokens"] for b in itertools.islice(packing.Packer(iter(stream(200)), LENGTHS, 4), 10)]
  b = [b["encoder_input_tokens"] for b in itertools.islice(packing.Packer(iter(stream(200)), LENGTHS, 4), 10)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  with pytest.raises(ValueError, match="lookahead"):
    packing.Packer(iter(stream(5)), LENGTHS, rows=4, lookahead=5)


def test_state_restored_into_a_fresh_packer_gives_the_same_batches():
  """A packer's `state()` (its waiting examples as flat arrays) restored into a packer reading the rest of the
  stream makes the batches the first would have made; an empty state restores to no waiting examples."""
  exs = stream(200, seed=2)
  whole = list(packing.Packer(iter(exs), LENGTHS, rows=4))
  first = packing.Packer(iter(exs), LENGTHS, rows=4)
  head = [next(first) for _ in range(5)]
  state = first.state()
  assert len(state["inputs_len"]) == len(first.waiting) == 4 and state["inputs"].size == sum(state["inputs_len"])
  drawn = sum(len(segments(b)) for b in head) + len(first.waiting)
  resumed = packing.Packer(iter(exs[drawn:]), LENGTHS, rows=4)
  resumed.restore({k: v.copy() for k, v in state.items()})
  tail = list(resumed)
  assert len(head) + len(tail) == len(whole)
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(whole, head + tail) for k in a)
  empty = packing.Packer(iter([]), LENGTHS, rows=4)
  empty.restore(packing.Packer(iter([]), LENGTHS, rows=4).state())
  assert empty.waiting == [] and list(empty) == []
