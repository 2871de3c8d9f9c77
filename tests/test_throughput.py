"""Truthful throughput: steps_per_sec is the rate of completed steps, the compile apart.

The test clocks a tiny run from outside the code it checks: the moment the train step has
been compiled and the moment each metrics row is handed to the writer. The rate a row
reports must match its window's wall time (within 20%). Before the fix the loop read the
clock as soon as the window's steps were dispatched, which gave 10-60x the real rate on
short windows. (The tolerance allows the few milliseconds between the loop's clock and the
writer call, against windows of a few hundred milliseconds.)
"""

import contextlib
import dataclasses
import io
import json
import time

import pytest
from conftest import tiny_config

from dit import train

# Steps long enough (~20-50 ms on 2 CPU cores) that a window dwarfs the logging around it.
RUN = {
  "total_steps": 10,
  "log_every": 5,
  "ckpt_every": 100,  # One save, after the last row.
  "batch_size": 32,
  "model.hidden_size": 64,
  "model.depth": 2,
}


def clocked_setup(events):
  """train.setup whose step records when its compile finished."""
  real_setup = train.setup

  def setup(config):
    s = real_setup(config)

    class Step:
      def lower(self, *args):
        lowered = s.step.lower(*args)

        class Lowered:
          def compile(self):
            compiled = lowered.compile()
            events.append(("compiled", time.perf_counter()))
            return compiled

        return Lowered()

    return dataclasses.replace(s, step=Step())

  return setup


@pytest.mark.slow  # A real train run (about 20 s).
def test_steps_per_sec_is_the_wall_rate_of_the_window(tmp_path, monkeypatch):
  events = []
  monkeypatch.setattr(train, "setup", clocked_setup(events))
  write = train.MetricWriter.write

  def clocked_write(self, step, metrics):
    events.append(("row", time.perf_counter()))
    write(self, step, metrics)

  monkeypatch.setattr(train.MetricWriter, "write", clocked_write)
  with contextlib.redirect_stdout(io.StringIO()):
    train.train_and_evaluate(tiny_config(**RUN), str(tmp_path / "run"))
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [5, 10]
  times = [t for _, t in events]
  assert [kind for kind, _ in events] == ["compiled", "row", "row"]
  for i, row in enumerate(rows):
    wall_rate = 5 / (times[i + 1] - times[i])
    assert row["steps_per_sec"] == pytest.approx(wall_rate, rel=0.2), (i, row, wall_rate)
    assert row["img_per_sec"] == pytest.approx(32 * row["steps_per_sec"])
  # The compile is reported once, on the first row, and is not in any window.
  assert rows[0]["compile_seconds"] > 0
  assert not any("compile_seconds" in r for r in rows[1:])


def test_progress_bar_eta_comes_from_the_measured_rate():
  bar = train._progress_bar(100, 0)
  try:
    bar.update(40)
    bar.measured_rate = 10.0  # As _log_row sets it from a row's steps_per_sec.
    text = str(bar)
    assert "10.00step/s" in text and "<00:06" in text, text  # 60 steps left at 10/s.
    bar.measured_rate = 2.0
    assert "<00:30" in str(bar)
  finally:
    bar.close()
