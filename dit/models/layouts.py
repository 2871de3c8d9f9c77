"""The PyTorch layouts of DiT and PixArt (and SD3's MMDiT, import only): one rule table, read
both ways.

The importer (dit/models/convert.py) maps PyTorch tensors to Flax params with `to_flax`; the
exporter (dit/models/export.py) maps them back with `to_torch`, from the same rules. A rule
maps one Flax param (a path in the param tree) to one or more PyTorch tensors by name:

  "dense": torch Linear weights (out, in), concatenated along out  <-> kernel (in, out)
  "bias":  torch biases, concatenated                                <-> bias (out,)
  "patch": conv weight (D, C, p, p)                                  <-> kernel (p*p*C, D)
  "copy":  same shape

Layouts (torch Linear weight (out, in) <-> Flax kernel (in, out), i.e. transposed):
  x_embedder.proj / pos_embed.proj (D, C, p, p) conv  <-> x_embedder/kernel (p*p*C, D)
  t_embedder.mlp.{0,2} / *.timestep_embedder.linear_{1,2} <-> t_embedder/mlp_{0,2}
  y_embedder.embedding_table / *.class_embedder.embedding_table <-> y_embedder/embedding
  blocks.{i}.attn.qkv  or attn1.to_{q,k,v} (concatenated)   <-> blocks_{i}/attn/qkv
  blocks.{i}.attn.proj or attn1.to_out.0                    <-> blocks_{i}/attn/proj
  attn2.to_q / attn2.to_{k,v} / attn2.to_out.0  <-> blocks_{i}/cross_attn/{q_linear,kv_linear,proj}
  mlp.fc{1,2} or ff.net.{0.proj,2}                          <-> blocks_{i}/mlp/fc{1,2}
  adaLN_modulation.1 or norm1.linear                         <-> blocks_{i}/adaLN_modulation_1
  final_layer.* or proj_out_{1,2} / scale_shift_table, proj_out <-> final_layer/*
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Rule = tuple[tuple[str, ...], tuple[str, ...], str]

# diffusers' DiT keeps a copy of the timestep/label embedder in every block; this is block i's.
DIT_EMBEDDER = "transformer_blocks.{i}.norm1.emb"


def linear(flax_prefix: tuple[str, ...], torch_prefixes: Sequence[str]) -> list[Rule]:
  """The kernel and bias rules of one Dense fed by the torch Linears `torch_prefixes`."""
  return [
    (flax_prefix + ("kernel",), tuple(f"{t}.weight" for t in torch_prefixes), "dense"),
    (flax_prefix + ("bias",), tuple(f"{t}.bias" for t in torch_prefixes), "bias"),
  ]


def torch_shape(kind: str, shape: tuple[int, ...], n: int, patch_size: int) -> tuple[int, ...]:
  """The shape of each of the n torch tensors of a Flax param of `shape`."""
  if kind == "dense":
    return (shape[1] // n, shape[0])
  if kind == "bias":
    return (shape[0] // n,)
  if kind == "patch":
    p = patch_size
    return (shape[1], shape[0] // (p * p), p, p)
  return tuple(shape)


def to_flax(kind: str, arrays: list[np.ndarray]) -> np.ndarray:
  """The torch tensors of one rule -> the Flax param."""
  if kind == "dense":
    return np.concatenate(arrays, axis=0).T
  if kind == "bias":
    return np.concatenate(arrays, axis=0)
  if kind == "patch":
    (w,) = arrays
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
  (w,) = arrays
  return w


def to_torch(kind: str, array: np.ndarray, n: int, patch_size: int) -> list[np.ndarray]:
  """The inverse of `to_flax`: a Flax param -> its n torch tensors (C-contiguous)."""
  if kind == "dense":
    parts = np.split(array.T, n, axis=0)
  elif kind == "bias":
    parts = np.split(array, n)
  elif kind == "patch":
    p = patch_size
    parts = [array.reshape(p, p, array.shape[0] // (p * p), array.shape[1]).transpose(3, 2, 0, 1)]
  else:
    parts = [array]
  return [np.ascontiguousarray(a) for a in parts]


def dit_rules(depth: int, num_classes: int) -> list[Rule]:
  """Rules for the official DiT state dict."""
  rules: list[Rule] = [
    (("x_embedder", "kernel"), ("x_embedder.proj.weight",), "patch"),
    (("x_embedder", "bias"), ("x_embedder.proj.bias",), "copy"),
    *linear(("t_embedder", "mlp_0"), ["t_embedder.mlp.0"]),
    *linear(("t_embedder", "mlp_2"), ["t_embedder.mlp.2"]),
    *linear(("final_layer", "adaLN_modulation_1"), ["final_layer.adaLN_modulation.1"]),
    *linear(("final_layer", "linear"), ["final_layer.linear"]),
  ]
  if num_classes > 0:
    rules.append((("y_embedder", "embedding"), ("y_embedder.embedding_table.weight",), "copy"))
  for i in range(depth):
    f, t = f"blocks_{i}", f"blocks.{i}"
    rules += linear((f, "attn", "qkv"), [f"{t}.attn.qkv"])
    rules += linear((f, "attn", "proj"), [f"{t}.attn.proj"])
    rules += linear((f, "mlp", "fc1"), [f"{t}.mlp.fc1"])
    rules += linear((f, "mlp", "fc2"), [f"{t}.mlp.fc2"])
    rules += linear((f, "adaLN_modulation_1"), [f"{t}.adaLN_modulation.1"])
  return rules


def block_rules(f: str, t: str, cross: bool) -> list[Rule]:
  """A diffusers BasicTransformerBlock `t` <-> DiT block `f` (attention, MLP)."""
  rules = linear((f, "attn", "qkv"), [f"{t}.attn1.to_q", f"{t}.attn1.to_k", f"{t}.attn1.to_v"])
  rules += linear((f, "attn", "proj"), [f"{t}.attn1.to_out.0"])
  if cross:
    rules += linear((f, "cross_attn", "q_linear"), [f"{t}.attn2.to_q"])
    rules += linear((f, "cross_attn", "kv_linear"), [f"{t}.attn2.to_k", f"{t}.attn2.to_v"])
    rules += linear((f, "cross_attn", "proj"), [f"{t}.attn2.to_out.0"])
  rules += linear((f, "mlp", "fc1"), [f"{t}.ff.net.0.proj"])
  rules += linear((f, "mlp", "fc2"), [f"{t}.ff.net.2"])
  return rules


def diffusers_dit_rules(depth: int) -> list[Rule]:
  """Rules for diffusers' DiTTransformer2DModel; the shared embedder is block 0's copy."""
  emb = DIT_EMBEDDER.format(i=0)
  rules: list[Rule] = [
    (("x_embedder", "kernel"), ("pos_embed.proj.weight",), "patch"),
    (("x_embedder", "bias"), ("pos_embed.proj.bias",), "copy"),
    *linear(("t_embedder", "mlp_0"), [f"{emb}.timestep_embedder.linear_1"]),
    *linear(("t_embedder", "mlp_2"), [f"{emb}.timestep_embedder.linear_2"]),
    (("y_embedder", "embedding"), (f"{emb}.class_embedder.embedding_table.weight",), "copy"),
    *linear(("final_layer", "adaLN_modulation_1"), ["proj_out_1"]),
    *linear(("final_layer", "linear"), ["proj_out_2"]),
  ]
  for i in range(depth):
    f, t = f"blocks_{i}", f"transformer_blocks.{i}"
    rules += block_rules(f, t, cross=False)
    rules += linear((f, "adaLN_modulation_1"), [f"{t}.norm1.linear"])
  return rules


def pixart_rules(depth: int, size_conditioning: bool, learned_null: bool) -> list[Rule]:
  """Rules for diffusers' PixArtTransformer2DModel (+ y_embedding, which diffusers lacks)."""
  emb = "adaln_single.emb"
  rules: list[Rule] = [
    (("x_embedder", "kernel"), ("pos_embed.proj.weight",), "patch"),
    (("x_embedder", "bias"), ("pos_embed.proj.bias",), "copy"),
    *linear(("t_embedder", "mlp_0"), [f"{emb}.timestep_embedder.linear_1"]),
    *linear(("t_embedder", "mlp_2"), [f"{emb}.timestep_embedder.linear_2"]),
    *linear(("t_block_1",), ["adaln_single.linear"]),
    *linear(("y_proj", "fc1"), ["caption_projection.linear_1"]),
    *linear(("y_proj", "fc2"), ["caption_projection.linear_2"]),
    (("final_layer", "scale_shift_table"), ("scale_shift_table",), "copy"),
    *linear(("final_layer", "linear"), ["proj_out"]),
  ]
  if size_conditioning:
    for name in ("resolution", "aspect_ratio"):
      rules += linear((f"{name}_embedder", "mlp_0"), [f"{emb}.{name}_embedder.linear_1"])
      rules += linear((f"{name}_embedder", "mlp_2"), [f"{emb}.{name}_embedder.linear_2"])
  if learned_null:
    rules.append((("y_embedding",), ("y_embedding",), "copy"))
  for i in range(depth):
    f, t = f"blocks_{i}", f"transformer_blocks.{i}"
    rules += block_rules(f, t, cross=True)
    rules.append(((f, "scale_shift_table"), (f"{t}.scale_shift_table",), "copy"))
  return rules


# ---- SD3 (diffusers' SD3Transformer2DModel <-> dit.models.mmdit.MMDiT) ----------------------

# diffusers' QK-norm modules -> MMDiT's (both streams; "added" is the text stream).
SD3_QK_NORMS = {
  "q_norm": "norm_q",
  "k_norm": "norm_k",
  "context_q_norm": "norm_added_q",
  "context_k_norm": "norm_added_k",
}


def sd3_rules(depth: int, qk_norm: str) -> list[Rule]:
  """Rules for diffusers' SD3Transformer2DModel (SD3-style blocks, no dual attention).

  The last block is context-pre-only: its text stream gives keys and values only, so its
  attn.add_q_proj and attn.norm_added_q have no MMDiT param (`sd3_unused` lists them).
  """
  emb = "time_text_embed"
  rules: list[Rule] = [
    (("x_embedder", "kernel"), ("pos_embed.proj.weight",), "patch"),
    (("x_embedder", "bias"), ("pos_embed.proj.bias",), "copy"),
    *linear(("t_embedder", "mlp_0"), [f"{emb}.timestep_embedder.linear_1"]),
    *linear(("t_embedder", "mlp_2"), [f"{emb}.timestep_embedder.linear_2"]),
    *linear(("pooled_embedder", "linear_1"), [f"{emb}.text_embedder.linear_1"]),
    *linear(("pooled_embedder", "linear_2"), [f"{emb}.text_embedder.linear_2"]),
    *linear(("context_embedder",), ["context_embedder"]),
    *linear(("final_layer", "adaLN_modulation_1"), ["norm_out.linear"]),  # (scale, shift).
    *linear(("final_layer", "linear"), ["proj_out"]),
  ]
  for i in range(depth):
    f, t = f"blocks_{i}", f"transformer_blocks.{i}"
    last = i == depth - 1
    rules += linear((f, "adaLN_modulation_1"), [f"{t}.norm1.linear"])
    rules += linear((f, "context_adaLN_modulation_1"), [f"{t}.norm1_context.linear"])
    rules += linear((f, "attn", "qkv"), [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"])
    rules += linear((f, "attn", "proj"), [f"{t}.attn.to_out.0"])
    context = ("k", "v") if last else ("q", "k", "v")
    name = "context_kv" if last else "context_qkv"
    rules += linear((f, "attn", name), [f"{t}.attn.add_{n}_proj" for n in context])
    rules += linear((f, "mlp", "fc1"), [f"{t}.ff.net.0.proj"])
    rules += linear((f, "mlp", "fc2"), [f"{t}.ff.net.2"])
    if not last:
      rules += linear((f, "attn", "context_proj"), [f"{t}.attn.to_add_out"])
      rules += linear((f, "context_mlp", "fc1"), [f"{t}.ff_context.net.0.proj"])
      rules += linear((f, "context_mlp", "fc2"), [f"{t}.ff_context.net.2"])
    for ours, theirs in SD3_QK_NORMS.items() if qk_norm else ():
      if last and ours == "context_q_norm":
        continue
      rules.append(((f, "attn", ours, "scale"), (f"{t}.attn.{theirs}.weight",), "copy"))
      if qk_norm == "layer_norm":
        rules.append(((f, "attn", ours, "bias"), (f"{t}.attn.{theirs}.bias",), "copy"))
  return rules


def sd3_unused(depth: int, qk_norm: str, hidden: int, head_dim: int) -> dict[str, tuple]:
  """{name: shape} of the SD3 tensors that compute nothing: the last block's text queries."""
  t = f"transformer_blocks.{depth - 1}.attn"
  unused = {f"{t}.add_q_proj.weight": (hidden, hidden), f"{t}.add_q_proj.bias": (hidden,)}
  if qk_norm:
    unused[f"{t}.norm_added_q.weight"] = (head_dim,)
  if qk_norm == "layer_norm":
    unused[f"{t}.norm_added_q.bias"] = (head_dim,)
  return unused
