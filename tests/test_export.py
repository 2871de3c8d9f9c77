"""The exporter (dit/models/export.py): dit workdirs -> diffusers model directories.

Without torch (a core install): every exported PyTorch tensor is in its place and
orientation (Linear weights transposed, square ones included; the patch convolution checked
by its definition; the shared embedder in every block), export -> import
(dit.models.convert) gives back bit-identical params, the scheduler config of the digits
demo is the one below, and models diffusers cannot represent are refused naming the field.

With the torch extra: diffusers' `from_pretrained` loads the export, computes what our DiT
and PixArt compute (float32, CPU; measured max |diff| ~1e-6, allowed 1e-4), re-saves it as
the same files (`save_pretrained`), and the exported schedulers have our training schedule
(alphas_cumprod, timesteps, flow sigmas).
"""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpy_dit
import pytest
from conftest import ROOT, tiny_config
from flax import traverse_util

from dit import checkpoint
from dit.diffusion import flow as flow_lib
from dit.diffusion import flow_samplers, samplers, schedules
from dit.models import convert, export
from dit.models.dit import DiT, abstract_params, build_model, example_inputs
from dit.optim import make_optimizer

try:
  import diffusers
  import torch
except ImportError:  # The core install: the torch-free tests still run.
  torch = diffusers = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs the torch extra (dit[torch])")

TOL = 1e-4  # float32 parity with diffusers (measured: ~1e-6).
B, S, C, D = 3, 8, 3, 32  # C = 3 channels: the patch layout (u, v, c) matters.
DIT = dict(model__in_channels=C, model__depth=2, model__learn_sigma=True)
# PixArt-alpha 1024px-style: size micro-conditioning, interpolated positions, learned null.
PIXART = dict(
  model__hidden_size=48, model__num_heads=3, model__depth=2, model__caption_channels=24,
  model__caption_length=6, model__in_channels=C, model__learn_sigma=True,
)  # fmt: skip


def _random_params(model, seed):
  """Random non-zero params (DiT zero-inits adaLN and the final layer: every tensor matters)."""
  rng = np.random.default_rng(seed)
  shapes = traverse_util.flatten_dict(abstract_params(model))
  flat = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in shapes.items()}
  return traverse_util.unflatten_dict(flat)


def _config(config_file="configs/digits.py", **overrides):
  """tiny_config with `overrides` ("a.b" as a__b) that may add keys the file leaves out."""
  config = tiny_config(config_file)
  with config.unlocked():
    for key, value in overrides.items():
      *parents, leaf = key.split("__")
      node = config
      for name in parents:
        node = node[name]
      node[leaf] = value
  return config


def _pixart_config(**overrides):
  return _config(
    "configs/t2i_pixart.py",
    **PIXART,
    model__size_conditioning=True,
    model__pe_interpolation=2.0,
    **overrides,
  )


def _write_run(workdir, config, ema, raw):
  """A workdir whose EMA and raw params differ (dit.train's layout, step 0)."""
  state = checkpoint.new_state(raw, make_optimizer(config)[0], jax.random.PRNGKey(0))
  state["ema_params"] = ema
  mngr = checkpoint.manager(checkpoint.prepare_workdir(workdir), config)
  checkpoint.save(mngr, state, {"step": 0}, force=True)
  mngr.wait_until_finished()
  checkpoint.write_config(workdir, config)


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
  """(config, model, EMA params, raw params, workdir, export dir) of a tiny DiT."""
  root = tmp_path_factory.mktemp("dit")
  config = _config(**DIT)
  model = build_model(config.model)
  ema, raw = _random_params(model, 1), _random_params(model, 2)
  _write_run(str(root / "run"), config, ema, raw)
  with pytest.warns(UserWarning, match=r"time_freq_shift=0, but diffusers' DiT"):
    summary = export.export_workdir(str(root / "run"), str(root / "out"))
  assert summary["model"] == "DiTTransformer2DModel" and summary["scheduler"] == "DDIMScheduler"
  return config, model, ema, raw, str(root / "run"), str(root / "out")


@pytest.fixture(scope="module")
def pixart_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pixart")
  config = _pixart_config()
  model = build_model(config.model)
  params = _random_params(model, 3)
  summary = export.export_diffusers(params, config, str(root / "out"))  # Workdirs: dit_run.
  assert summary["warnings"] == [] and export.NULL_CAPTION in summary["files"]
  return config, model, params, str(root / "out")


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _weights(out):
  from safetensors.numpy import load_file

  return load_file(os.path.join(out, export.WEIGHTS))


def _conv_patches(x, weight, bias):
  """torch Conv2d(C, D, kernel p, stride p) on NHWC x, by its definition -> (B, N, D)."""
  b, h, w, c = x.shape
  p = weight.shape[-1]
  blocks = x.reshape(b, h // p, p, w // p, p, c)
  return np.einsum("biujvc,dcuv->bijd", blocks, weight).reshape(b, -1, weight.shape[0]) + bias


# ---- Without torch -------------------------------------------------------------------------------


def test_dit_tensors_are_in_diffusers_places_and_orientations(dit_run):
  _, _, ema, _, _, out = dit_run
  sd, flat = _weights(out), _flat(ema)
  emb = "transformer_blocks.{i}.norm1.emb"
  # (torch Linear, Flax Dense, which of the fused outputs): diffusers' names, written out here.
  linears = [
    ("transformer_blocks.1.attn1.to_q", "blocks_1/attn/qkv", 0),
    ("transformer_blocks.1.attn1.to_k", "blocks_1/attn/qkv", 1),
    ("transformer_blocks.0.attn1.to_v", "blocks_0/attn/qkv", 2),
    ("transformer_blocks.0.attn1.to_out.0", "blocks_0/attn/proj", 0),  # square
    ("transformer_blocks.1.ff.net.0.proj", "blocks_1/mlp/fc1", 0),
    ("transformer_blocks.1.ff.net.2", "blocks_1/mlp/fc2", 0),
    ("transformer_blocks.0.norm1.linear", "blocks_0/adaLN_modulation_1", 0),
    ("proj_out_1", "final_layer/adaLN_modulation_1", 0),
    ("proj_out_2", "final_layer/linear", 0),
  ]
  for i in range(2):  # The shared embedder, in every block.
    linears.append((emb.format(i=i) + ".timestep_embedder.linear_1", "t_embedder/mlp_0", 0))
    linears.append((emb.format(i=i) + ".timestep_embedder.linear_2", "t_embedder/mlp_2", 0))
    table = sd[emb.format(i=i) + ".class_embedder.embedding_table.weight"]
    np.testing.assert_array_equal(table, flat["y_embedder/embedding"])
  squares = 0
  for name, path, k in linears:
    w, b = sd[f"{name}.weight"], sd[f"{name}.bias"]
    n = w.shape[0]
    np.testing.assert_array_equal(w, flat[f"{path}/kernel"][:, k * n : (k + 1) * n].T, name)
    np.testing.assert_array_equal(b, flat[f"{path}/bias"][k * n : (k + 1) * n], name)
    squares += w.shape[0] == w.shape[1]
    assert w.flags.c_contiguous
  assert squares >= 3  # Square kernels are where a missing transpose keeps the shape.
  x = np.random.default_rng(0).standard_normal((2, S, S, C))
  got = _conv_patches(x, sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"])
  want = numpy_dit.patchify(x, 2) @ flat["x_embedder/kernel"] + flat["x_embedder/bias"]
  np.testing.assert_allclose(got, want, atol=1e-12)
  # Nothing else: the patch conv, per block 7 Linears and the embedder's 2 and a table, the
  # final layer's 2 Linears.
  assert len(sd) == 2 + 2 * (2 * 7 + 2 * 2 + 1) + 2 * 2


def _same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype == np.float32, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_dit_export_then_import_is_bit_identical(dit_run):
  _, model, ema, _, _, out = dit_run
  params, kwargs = convert.convert_diffusers_dit(out)
  _same_params(params, ema)
  assert kwargs == dict(
    input_size=S, patch_size=2, in_channels=C, hidden_size=D, depth=2, num_heads=2,
    num_classes=10, learn_sigma=True, block="adaln_zero", time_freq_shift=1.0,
  )  # fmt: skip


def test_raw_params_export(dit_run, tmp_path):
  config, model, ema, raw, workdir, _ = dit_run
  with pytest.warns(UserWarning, match="time_freq_shift"):
    export.export_workdir(workdir, str(tmp_path), use_ema=False)
  params, _ = convert.convert_diffusers_dit(str(tmp_path))
  _same_params(params, raw)
  assert not np.array_equal(_flat(raw)["x_embedder/kernel"], _flat(ema)["x_embedder/kernel"])


def test_pixart_export_then_import_is_bit_identical(pixart_run, tmp_path):
  config, model, params, out = pixart_run
  null = np.load(os.path.join(out, export.NULL_CAPTION))
  back, kwargs = convert.convert_pixart(out, null_caption=null)
  _same_params(back, params)
  fields = {k: getattr(model, k) for k in kwargs}
  assert kwargs == fields and kwargs["size_conditioning"] and kwargs["pe_interpolation"] == 2.0
  # A frozen null caption is no param; the file holds the table the model draws.
  config = _pixart_config(model__null_caption="frozen")
  frozen = build_model(config.model)
  params = {k: v for k, v in params.items() if k != "y_embedding"}
  export.export_diffusers(params, config, str(tmp_path))
  back, kwargs = convert.convert_pixart(str(tmp_path))
  _same_params(back, params)
  assert kwargs["null_caption"] == "frozen"
  x, t, cond = example_inputs(frozen, 2)
  cond["drop"] = jnp.ones((2,), bool)  # Dropped rows see the frozen null caption ...
  cond["text"] = cond["text"] + 1.0
  apply = jax.jit(frozen.apply)
  want = apply({"params": params}, x, t, cond)
  cond = {**cond, "text": jnp.asarray(np.load(tmp_path / export.NULL_CAPTION))[None].repeat(2, 0)}
  cond["drop"] = jnp.zeros((2,), bool)  # ... which is the exported file.
  # Measured 5e-7 (XLA fuses the in-graph table differently); a wrong table is off by O(1).
  np.testing.assert_allclose(apply({"params": params}, x, t, cond), want, atol=1e-5, rtol=0)


def test_digits_scheduler_config():
  # The demo's training schedule and sampler (configs/digits.py), by diffusers' names.
  assert export.scheduler_config(tiny_config()) == {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": export.DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "clip_sample": False,  # diffusers' DDIM clips by default; dit samples unclipped.
    "set_alpha_to_one": True,
  }
  flow = _config("configs/digits_flow.py", flow__shift=3.0)
  assert export.scheduler_config(flow) == {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": export.DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
  }


BASE = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2)
REFUSED = {  # config.model field: value diffusers cannot represent (DiT with 10 classes).
  "block": "adaln",
  "qk_norm": True,
  "guidance_embedding": True,
  "mlp_ratio": 2.0,
  "num_classes": 0,
  "caption_channels": 16,
  "size_conditioning": True,
  "pe_interpolation": 2.0,
}


@pytest.mark.parametrize("field", REFUSED)
def test_models_diffusers_cannot_represent_are_refused(field):
  kw = {**BASE, "num_classes": 10, field: REFUSED[field]}
  with pytest.raises(ValueError, match=rf"^Cannot export to diffusers: config\.model\.{field}="):
    export.check_exportable(DiT(**kw))


def test_pixart_fields_and_the_bounds_of_the_checks():
  pixart = dict(BASE, block="adaln_single", num_classes=0, caption_channels=16)
  with pytest.raises(ValueError, match=r"config\.model\.num_classes=10"):
    export.check_exportable(DiT(**dict(pixart, num_classes=10)))
  with pytest.raises(ValueError, match=r"config\.model\.caption_channels=0"):
    export.check_exportable(DiT(**dict(pixart, caption_channels=0)))
  # The bounds: exactly diffusers' values pass; only the sinusoid's shift is a warning.
  assert export.check_exportable(DiT(**BASE, num_classes=1, time_freq_shift=1.0)) == []
  assert export.check_exportable(DiT(**pixart, mlp_ratio=4.0)) == []
  (note,) = export.check_exportable(DiT(**BASE, num_classes=1))
  assert "match_time_freq_shift(model, 0)" in note


def test_params_of_another_model_are_refused(dit_run):
  _, model, ema, _, _, _ = dit_run
  # Same names, other shapes: the patch embedding and the final layer.
  with pytest.raises(ValueError, match=r"do not fit config\.model: \[.*'x_embedder/kernel'\]"):
    export.state_dict(ema, model.clone(in_channels=C + 1))
  with pytest.raises(ValueError, match="blocks_1"):
    export.state_dict(ema, model.clone(depth=1))


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(flow__reverse_time=True), r"config\.flow\.reverse_time=True"),
    (dict(flow__interpolant="gvp"), r"config\.flow\.interpolant='gvp'"),
    (dict(flow__target="noise"), r"config\.flow\.target='noise'"),
    (dict(flow__time_scale=999.5), r"config\.flow\.time_scale=999\.5"),
  ],
)
def test_flows_diffusers_cannot_sample_are_refused(overrides, message):
  with pytest.raises(ValueError, match=message):
    export.scheduler_config(_config("configs/digits_flow.py", **overrides))


def test_zero_terminal_snr_needs_a_scheduler_that_rescales():
  config = _config(diffusion__zero_terminal_snr=True, sample__sampler="heun")
  with pytest.raises(ValueError, match=r"zero_terminal_snr=True \(HeunDiscreteScheduler"):
    export.scheduler_config(config)
  config.sample.sampler = "euler"
  assert export.scheduler_config(config)["rescale_betas_zero_snr"] is True


def test_command_writes_what_the_library_writes(dit_run, tmp_path):
  _, _, _, _, workdir, out = dit_run
  code = "from dit.models.convert import export_cli; export_cli()"  # dit-export's entry point.
  args = [f"--workdir={workdir}", f"--out={tmp_path}", "--progress=false"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
    timeout=120,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-2000:]
  assert "wrote" in r.stdout and "DDIMScheduler" in r.stdout
  assert "warning: config.model.time_freq_shift=0" in r.stderr
  assert "export:" not in r.stderr  # --progress=false: no bar.
  for name in ("config.json", export.WEIGHTS, "scheduler/scheduler_config.json"):
    assert (tmp_path / name).read_bytes() == open(os.path.join(out, name), "rb").read(), name


# ---- Progress bars (tqdm, on stderr), each switchable off ---------------------------------------


def test_progress_bars_show_counts_and_switch_off(dit_run, tmp_path, capsys):
  from dit import fid_stats
  from dit.data.digits import DigitsSource
  from dit.data.precompute import precompute
  from dit.data.precomputed import shard_name

  class First20(DigitsSource):
    def __len__(self):
      return 20

  def identity(images, key):  # Pixels as "latents".
    return images

  kw = dict(encode_images=identity, resolution=8, channels=1, batch_size=4, shard_size=8)
  config, _, ema, _, _, out = dit_run
  for progress in (False, True):
    precompute(First20(8), str(tmp_path / f"p{progress}"), progress=progress, **kw)
    fid_stats.features_of_images(
      np.zeros((5, 2, 2, 3), np.uint8), lambda x: x[:, 0, 0], 2, progress
    )
    convert.convert_diffusers_dit(out, progress=progress)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # time_freq_shift: tested above.
      export.export_diffusers(ema, config, str(tmp_path / "e"), progress)
    err = capsys.readouterr().err
    if not progress:
      assert err == ""
  assert "precompute: 100%" in err and "20/20" in err and "img/s" in err
  assert "features: 100%" in err and "5/5" in err
  assert "convert: 100%" in err and "export: 100%" in err and "tensor/s" in err
  # A resumed run's bar starts at the shards already written (3 shards: 8 + 8 + 4 images).
  os.remove(tmp_path / "pTrue" / shard_name("label", 2, 3))
  precompute(First20(8), str(tmp_path / "pTrue"), progress=True, **kw)
  err = capsys.readouterr().err
  assert " 16/20" in err and "20/20" in err


# ---- With torch: diffusers loads and runs the export ---------------------------------------------


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, S, S, C)).astype(np.float32)
  t = np.array([0.0, 371.0, 999.0], np.float32)
  return x, t


def _ours(model, params, x, t, cond):
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t), cond)
  return np.asarray(out).transpose(0, 3, 1, 2)


@needs_torch
def test_diffusers_dit_computes_our_dit(dit_run):
  _, model, ema, _, _, out = dit_run
  m = diffusers.DiTTransformer2DModel.from_pretrained(out).eval()
  x, t = _inputs()
  labels = np.array([1, 7, 10])  # 10: the null class of classifier-free guidance.

  def ref():
    with torch.no_grad():
      tt, y = torch.from_numpy(t), torch.from_numpy(labels)
      return m(_nchw(x), timestep=tt, class_labels=y).sample.numpy()

  ours = _ours(model, ema, x, t, {"label": jnp.asarray(labels)})
  # Stock diffusers' sinusoid (downscale_freq_shift=1) is not this model's (0): a real change.
  assert np.abs(ref() - ours).max() > 1e-2
  export.match_time_freq_shift(m, model.time_freq_shift)
  np.testing.assert_allclose(ref(), ours, atol=TOL, rtol=0)


@needs_torch
def test_diffusers_pixart_computes_our_pixart(pixart_run):
  _, model, params, out = pixart_run
  m = diffusers.PixArtTransformer2DModel.from_pretrained(out).eval()
  null = np.load(os.path.join(out, export.NULL_CAPTION))
  x, t = _inputs(1)
  rng = np.random.default_rng(2)
  text = rng.standard_normal((B, 6, 24)).astype(np.float32)
  mask = np.ones((B, 6), np.int64)
  mask[0, 2:] = 0
  res = np.array([[512, 512], [1024, 768], [256, 1024]], np.float32)
  ar = (res[:, :1] / res[:, 1:]).astype(np.float32)
  added = {"resolution": torch.from_numpy(res), "aspect_ratio": torch.from_numpy(ar)}

  def ref(emb):
    with torch.no_grad():
      return m(
        _nchw(x),
        encoder_hidden_states=torch.from_numpy(np.ascontiguousarray(emb)),
        timestep=torch.from_numpy(t),
        encoder_attention_mask=torch.from_numpy(mask),
        added_cond_kwargs=added,
      ).sample.numpy()

  cond = dict(text=text, text_mask=mask, resolution=res, aspect_ratio=ar)
  np.testing.assert_allclose(ref(text), _ours(model, params, x, t, cond), atol=TOL, rtol=0)
  # Guidance's unconditional rows: our dropped caption is diffusers' negative_prompt_embeds.
  dropped = _ours(model, params, x, t, {**cond, "drop": np.ones(B, bool)})
  np.testing.assert_allclose(ref(np.broadcast_to(null, text.shape)), dropped, atol=TOL, rtol=0)


@needs_torch
@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_export_is_what_save_pretrained_writes(kind, dit_run, pixart_run, tmp_path):
  out = dit_run[-1] if kind == "dit" else pixart_run[-1]
  cls = diffusers.DiTTransformer2DModel if kind == "dit" else diffusers.PixArtTransformer2DModel
  cls.from_pretrained(out).save_pretrained(tmp_path)
  with open(os.path.join(out, "config.json")) as f, open(tmp_path / "config.json") as g:
    ours, theirs = json.load(f), json.load(g)
  theirs.pop("_name_or_path")
  assert ours == theirs
  a, b = _weights(out), _weights(str(tmp_path))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _scheduler(config, tmp_path):
  config_json = export.scheduler_config(config)
  path = tmp_path / "scheduler" / "scheduler_config.json"
  export._write_json(str(path), config_json)
  cls = getattr(diffusers, config_json["_class_name"])
  return cls.from_pretrained(str(tmp_path), subfolder="scheduler")


@needs_torch
@pytest.mark.parametrize(
  "overrides",
  [
    {},  # The demo: linear betas, eps, DDIM on a trailing grid.
    dict(diffusion__schedule="cosine", diffusion__prediction="v", sample__sampler="dpmpp_2m"),
    dict(
      diffusion__schedule="scaled_linear",
      diffusion__beta_start=0.00085,
      diffusion__beta_end=0.012,
      sample__sampler="euler",
      sample__timestep_spacing="leading",
      sample__steps_offset=1,
    ),  # fmt: skip
    dict(diffusion__schedule="sigmoid", diffusion__prediction="x0", sample__sampler="ddpm"),
  ],
)
def test_exported_scheduler_has_our_schedule_and_grid(overrides, tmp_path):
  config = _config(**overrides)
  sched = _scheduler(config, tmp_path)
  ours = np.asarray(schedules.from_config(config.diffusion).alphas_cumprod)
  # diffusers accumulates in float32, we in float64: measured 1.3e-5 at t = 999 (cosine).
  np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ours, rtol=5e-5, atol=0)
  prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
  assert sched.config.prediction_type == prediction[config.diffusion.prediction]
  settings = samplers.SamplerSettings.from_config(config, steps=7)
  sched.set_timesteps(7)
  want = samplers.sampler_timesteps(config.diffusion.num_timesteps, settings)
  np.testing.assert_allclose(sched.timesteps.numpy(), want, atol=1e-4)


@needs_torch
def test_exported_flow_scheduler_has_our_shifted_times(tmp_path):
  config = _config("configs/digits_flow.py", flow__shift=3.0)
  sched = _scheduler(config, tmp_path)
  sched.set_timesteps(7)
  flow = flow_lib.from_config(config)
  tau, model_t = flow_samplers.flow_times(
    flow, flow_samplers.FlowSamplerSettings("euler", 7, spacing="diffusers")
  )
  np.testing.assert_allclose(sched.sigmas.numpy()[:-1], tau, atol=1e-6)
  np.testing.assert_allclose(sched.timesteps.numpy(), model_t, atol=1e-3)
  assert sched.sigmas.numpy()[-1] == 0.0
