"""A RE-TYPED PyTorch reference of pytorch-fid's FID InceptionV3 (test use only).

pytorch-fid (`pytorch_fid/inception.py`) builds torchvision's `Inception3(num_classes=1008,
aux_logits=False)` and swaps in FIDInceptionA/C/E_1/E_2. Neither pytorch-fid nor
torchvision can be installed beside the CPU torch used here, so this file re-types those
classes in plain torch, keeping:
  - torchvision's module attribute names, so `state_dict()` keys are exactly those of
    `pt_inception-2015-12-05-6726825d.pth` (e.g. `Mixed_7c.branch_pool.bn.running_var`),
  - BasicConv2d = conv (no bias) -> BatchNorm2d(eps=0.001) -> ReLU,
  - the FID patches: average pools with count_include_pad=False in A, C, E_1, and a
    3x3/stride-1/pad-1 max pool in E_2 (Mixed_7c),
  - pytorch-fid's wrapper: F.interpolate(size=299, bilinear, align_corners=False), then
    2x-1 on inputs in [0, 1]; pool3 = global average pool of Mixed_7c.
It is a transcription, not the upstream code; the Flax model is checked against it.
"""

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    bp = self.branch_pool(bp)
    return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
    bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
    bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    bp = self.branch_pool(bp)
    return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
    bp = F.max_pool2d(x, kernel_size=3, stride=2)
    return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (pool="avg", count_include_pad=False) and E_2 (pool="max")."""

  def __init__(self, cin, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.pool == "max":
      bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    bp = self.branch_pool(bp)
    return torch.cat([b1, b3, bd, bp], 1)


class FIDInception3(nn.Module):
  """torchvision Inception3(num_classes=1008, aux_logits=False) with the FID blocks."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, pool="avg")
    self.Mixed_7c = FIDInceptionE(2048, pool="max")
    self.fc = nn.Linear(2048, 1008)

  def forward(self, inp):
    """inp: (B, 3, H, W) in [0, 1] -> (pool3 (B, 2048), logits (B, 1008))."""
    x = F.interpolate(inp, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool, self.fc(pool)


def randomize_(model: nn.Module, seed: int = 0) -> None:
  """Random weights that keep activations O(1) through the ~100 layers.

  He-normal convolutions and BatchNorm with random affine and running statistics
  near (0, 1), so the parity check compares values of a sensible size.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
        m.running_mean.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
        m.running_var.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
