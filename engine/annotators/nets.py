"""The annotator networks that no maintained library ships, written here from their papers'
published architectures so that the published weight files (lllyasviel/Annotators) load by
their own key names:

- ``HEDNet``: ControlNet's HED (five VGG-like stages, a 1x1 side output each; RGB in 0..255 minus a
  learned per-channel offset), ``ControlNetHED.pth``.
- ``LineartNet``: the informative-drawings generator (reflection-padded convs, instance norms,
  residual blocks, sigmoid output), ``sk_model.pth`` (fine) and ``sk_model2.pth`` (coarse).
- ``BodyPoseNet``: OpenPose's body model (VGG front, 6 stages of two branches: 38 part-affinity
  maps and 19 heatmaps), ``body_pose_model.pth`` (its keys are the layer names alone, e.g.
  ``conv1_1.weight``: ``load_body_pose`` maps them).

Every size is a constructor argument, so the tests build tiny random copies.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


# ---------------------------------------------------------------------------------------------
# HED


class _HEDStage(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers))
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNet(nn.Module):
    """Five side outputs (logits, at 1, 1/2, 1/4, 1/8 and 1/16 of the input's size) of an RGB
    image in 0..255."""

    def __init__(self, widths=(64, 128, 256, 512, 512), layers=(2, 2, 3, 3, 3)):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        cin = 3
        for i, (width, count) in enumerate(zip(widths, layers)):
            self.add_module(f"block{i + 1}", _HEDStage(cin, width, count))
            cin = width
        self.depth = len(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, sides = x - self.norm, []
        for i in range(self.depth):
            h, side = getattr(self, f"block{i + 1}")(h, pool=i > 0)
            sides.append(side)
        return sides


# ---------------------------------------------------------------------------------------------
# Line art (informative drawings)


def _norm_relu(width: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(width), nn.ReLU(inplace=True)]


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), *_norm_relu(width),
                                        nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartNet(nn.Module):
    """RGB in 0..1 -> one channel in 0..1 (white paper, dark lines)."""

    def __init__(self, width: int = 64, residual_blocks: int = 3):
        super().__init__()
        w = width
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, w, 7), *_norm_relu(w))
        self.model1 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), *_norm_relu(2 * w),
                                    nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), *_norm_relu(4 * w))
        self.model2 = nn.Sequential(*(_Residual(4 * w) for _ in range(residual_blocks)))
        up = dict(kernel_size=3, stride=2, padding=1, output_padding=1)
        self.model3 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, **up), *_norm_relu(2 * w),
                                    nn.ConvTranspose2d(2 * w, w, **up), *_norm_relu(w))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = part(x)
        return x


# ---------------------------------------------------------------------------------------------
# OpenPose body


def _convs(names_and_shapes, last_plain: bool) -> nn.Sequential:
    """Named convs ``(name, cin, cout, kernel)`` each followed by a ReLU, except the last one when
    ``last_plain``; a ``(name,)`` entry is a 2x2 max pool."""
    layers = []
    for index, spec in enumerate(names_and_shapes):
        if len(spec) == 1:
            layers.append((spec[0], nn.MaxPool2d(2, 2)))
            continue
        name, cin, cout, kernel = spec
        layers.append((name, nn.Conv2d(cin, cout, kernel, padding=kernel // 2)))
        if not (last_plain and index == len(names_and_shapes) - 1):
            layers.append((f"relu_{name}", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class BodyPoseNet(nn.Module):
    """BGR in -0.5..0.5 -> (part affinity fields [38 channels], heatmaps [19 channels]) at 1/8 of
    the input's size, after six stages."""

    PAFS, HEATMAPS = 38, 19

    def __init__(self, widths=(64, 128, 256, 512), feature: int = 128, stage_width: int = 128, stages: int = 6):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.model0 = _convs([("conv1_1", 3, w1, 3), ("conv1_2", w1, w1, 3), ("pool1_stage1",),
                              ("conv2_1", w1, w2, 3), ("conv2_2", w2, w2, 3), ("pool2_stage1",),
                              ("conv3_1", w2, w3, 3), ("conv3_2", w3, w3, 3), ("conv3_3", w3, w3, 3),
                              ("conv3_4", w3, w3, 3), ("pool3_stage1",),
                              ("conv4_1", w3, w4, 3), ("conv4_2", w4, w4, 3), ("conv4_3_CPM", w4, 2 * feature, 3),
                              ("conv4_4_CPM", 2 * feature, feature, 3)], last_plain=False)
        s = stage_width
        for branch, out in ((1, self.PAFS), (2, self.HEATMAPS)):
            self.add_module(f"model1_{branch}", _convs(
                [(f"conv5_{k}_CPM_L{branch}", feature if k == 1 else s, s, 3) for k in (1, 2, 3)]
                + [(f"conv5_4_CPM_L{branch}", s, 4 * s, 1), (f"conv5_5_CPM_L{branch}", 4 * s, out, 1)],
                last_plain=True))
            for t in range(2, stages + 1):
                cin = feature + self.PAFS + self.HEATMAPS
                self.add_module(f"model{t}_{branch}", _convs(
                    [(f"Mconv{k}_stage{t}_L{branch}", cin if k == 1 else s, s, 7) for k in range(1, 6)]
                    + [(f"Mconv6_stage{t}_L{branch}", s, s, 1), (f"Mconv7_stage{t}_L{branch}", s, out, 1)],
                    last_plain=True))
        self.stages = stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model0(x)
        pafs, heat = self.model1_1(features), self.model1_2(features)
        for t in range(2, self.stages + 1):
            joined = torch.cat([pafs, heat, features], 1)
            pafs, heat = getattr(self, f"model{t}_1")(joined), getattr(self, f"model{t}_2")(joined)
        # The published model keeps a ReLU after its very last heatmap conv (and only there).
        return pafs, F.relu(heat) if self.stages > 1 else heat


def body_pose_keys(net: BodyPoseNet, state: dict) -> dict:
    """The published file names each tensor by its layer alone (``conv1_1.weight``); ours carry the
    block too (``model0.conv1_1.weight``). Either form is accepted."""
    ours = net.state_dict()
    if set(state) >= set(ours):
        return state
    mapped = {}
    for key in ours:
        short = key.split(".", 1)[1]
        if short in state:
            mapped[key] = state[short]
    return mapped
