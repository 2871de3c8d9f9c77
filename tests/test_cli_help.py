"""`-h` / `--help` of every command: its own flags with defaults, the valid values, exit 0.

The help of all four commands is checked in this process (`run_command_here`); two real
entry points (a console script and `python -m`) run as subprocesses by default, all eight
with -m slow.
"""

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_early_checks import run_command_here

from dit import evaluate, evaluation, info, sample, train
from dit.diffusion import flow_samplers, samplers, schedules

# command -> flags its help must show (name and default).
OWN_FLAGS = {
  train: ["--config=TEXT", "--workdir=TEXT", "--[no]config_keys", "--init_from=TEXT"],
  sample: [
    "--num=INT",
    "--out=TEXT",
    "(default: grid.png)",
    "--sampler=TEXT",
    "--steps=INT",
    "--[no]karras",
    "--cfg_scale=FLOAT",
    "--guidance_rescale=FLOAT",
    "--guidance_interval=A,B,...",
    "--seed=INT",
    "PRNG seed. (default: 0)",
    "--labels=A,B,...",
    "--prompt=TEXT (repeatable)",
    "--init_image=TEXT",
    "--strength=FLOAT",
    "--mask=TEXT",
    "white = keep",
  ],
  evaluate: ["--workdir=TEXT", "--seed=INT", "--[no]raw_params", "(default: false)"],
  info: ["--config=TEXT", "--workdir=TEXT"],
}
# Library flags that --help leaves to --helpfull.
LIBRARY_FLAGS = ("--verbosity", "--logtostderr", "--grain", "--jax_", "--only_check_args")


def check_help(text: str, command) -> None:
  for fragment in OWN_FLAGS[command]:
    assert fragment in text, (command.__name__, fragment)
  for fragment in LIBRARY_FLAGS:
    assert fragment not in text, (command.__name__, fragment)
  assert "--config_keys prints every key" in text and "--helpfull" in text
  assert len(text.splitlines()) < 130, len(text.splitlines())


@pytest.mark.parametrize("command", [train, sample, evaluate, info], ids=lambda m: m.__name__)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands_own_flags(command, flag, monkeypatch, capsys):
  code, out, err = run_command_here(command, flag, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 0 and not err, err
  check_help(out, command)


def test_help_lists_the_valid_values(monkeypatch, capsys):
  run = lambda command: run_command_here(command, "-h", monkeypatch=monkeypatch, capsys=capsys)[1]
  flat = lambda text: " ".join(text.split())  # Wrapped lines joined.
  sample_help, train_help, evaluate_help = (flat(run(c)) for c in (sample, train, evaluate))
  for name in [*samplers.SAMPLERS, *flow_samplers.FLOW_SAMPLERS]:
    assert name in sample_help and name in train_help, name
  assert "lcm: distilled models only" in sample_help
  for name in schedules.BETA_SCHEDULES:
    assert name in train_help, name
  for name in evaluation.METRICS:
    assert f"eval.metric: {', '.join(evaluation.METRICS)}" in evaluate_help, name


def _help_subprocess(*cmd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_help_of_the_real_entry_points():
  """The console script (before: "USAGE ... Try --helpfull", exit 1) and python -m."""
  script = os.path.join(os.path.dirname(sys.executable), "dit-sample")
  result = _help_subprocess(script, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  check_help(result.stdout, sample)
  result = _help_subprocess(sys.executable, "-m", "dit.train", "-h")
  assert result.returncode == 0, result.stderr[-2000:]
  check_help(result.stdout, train)


@pytest.mark.slow
@pytest.mark.parametrize("command", [train, sample, evaluate, info], ids=lambda m: m.__name__)
def test_help_of_every_entry_point(command):
  name = command.__name__.split(".")[-1]
  script = os.path.join(os.path.dirname(sys.executable), f"dit-{name}")
  for cmd in ([script, "-h"], [sys.executable, "-m", command.__name__, "--help"]):
    result = _help_subprocess(*cmd)
    assert result.returncode == 0, (cmd, result.stderr[-2000:])
    check_help(result.stdout, command)
