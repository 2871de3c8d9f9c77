"""Plot helpers the experiments share: pyplot without a display, one line per group of
records, a power-law fit with its confidence band."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Key = str | Callable[[dict], Any]


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _getter(key: Key) -> Callable[[dict], Any]:
  return key if callable(key) else (lambda r: r.get(key))


def lines(
  ax,
  records: Sequence[dict],
  x: Key,
  y: Key,
  by: Key,
  *,
  fmt: str | Callable[[dict], str] = "o-",
  **kwargs,
) -> list[str]:
  """One line per group of `records` (by(record) is its label), through (x, y) sorted by x.

  x, y, by: a record key or a function of the record; records whose y is None are left out.
  fmt: a matplotlib format string, or a function of a group's first record giving one.
  Returns the labels in the order drawn (the groups' first appearance).
  """
  x, y, by = _getter(x), _getter(y), _getter(by)
  groups: dict[str, list[dict]] = {}
  for r in records:
    if y(r) is not None:
      groups.setdefault(str(by(r)), []).append(r)
  for label, rs in groups.items():
    rs = sorted(rs, key=x)
    style = fmt(rs[0]) if callable(fmt) else fmt
    ax.plot([x(r) for r in rs], [y(r) for r in rs], style, label=label, **kwargs)
  return list(groups)


def power_law(ax, fit: dict | None, lo: float, hi: float, *, label: str = "", **kwargs) -> None:
  """The fit a * x^b of `experiments.scaling.power_law_fit` over [lo, hi], dashed, with its
  confidence band for the mean (from the fit's covariance) when it has one."""
  if not fit or not lo > 0 or not hi > 0:
    return
  x = np.geomspace(lo, hi, 64)
  text = f"{fit['a']:.3g} x^{fit['b']:.3f}"
  if fit.get("b_ci"):
    lo_b, hi_b = fit["b_ci"]
    text += f" [{lo_b:.3f}, {hi_b:.3f}]"
  color = kwargs.pop("color", "k")
  ax.plot(x, fit["a"] * x ** fit["b"], "--", color=color, lw=1, label=label or text, **kwargs)
  if fit.get("cov") and fit.get("t"):
    design = np.stack([np.ones_like(x), np.log(x)], axis=-1)
    se = np.sqrt(np.einsum("ni,ij,nj->n", design, np.asarray(fit["cov"]), design))
    mean = np.log(fit["a"]) + fit["b"] * np.log(x)
    band = np.exp(mean - fit["t"] * se), np.exp(mean + fit["t"] * se)
    ax.fill_between(x, *band, color=color, alpha=0.12, lw=0)


def save(fig, path: str, dpi: int = 100) -> None:
  """Lays out, writes and closes `fig`."""
  plt = pyplot()
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
