"""A small pre-activation ResNet on an image set (digits 1x8x8, CIFAR-10 3x32x32).

    stem:   x -> conv3x3(x)                                         (C_0 channels)
    block:  x -> x' + conv3x3(act(norm(conv3x3(act(norm(x))))))      (He et al. 2016, "identity mappings")
            x' = x, or conv1x1(act(norm(x))) when the channels change; the first block of every
            stage after the first halves the resolution with a 2x2 average pool (smooth, unlike a
            strided conv's aliasing or max pooling) after its first conv and on the shortcut
    head:   act(norm(x)) -> global average pool -> linear readout to K logits

``norm``: ``none`` (the identity), ``layer`` (GroupNorm with one group: each example normalized
over channels and pixels) or ``group`` (GroupNorm with ``groups`` groups). BatchNorm is not offered:
it couples the examples of a batch and, in training mode, makes the loss of one example depend
on the others', and its running statistics make the evaluated function change between steps, so a
full-batch loss would not be one fixed smooth function of w. The per-example norms here are
smooth functions of w (eps = 1e-5 inside the square root).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
from jaxtyping import Array

from eosflow.config import SpecError, option
from eosflow.data import ClassificationData, load_classification
from eosflow.problems.networks import (
    ACTIVATIONS,
    Activation,
    average_pool,
    image_shape,
    initialize,
    supervised_problem,
)
from eosflow.problems.registry import Problem, register_problem

Norm = Literal["none", "layer", "group"]


@dataclasses.dataclass(frozen=True)
class ResNetParams(ClassificationData):
    n_train: int = option(64, "training examples", ge=1)
    n_test: int = option(0, "held-out test examples (0: none)", ge=0)
    channels: tuple[int, ...] = option(
        (8, 16), "channels of each stage (every stage after the first halves the resolution)"
    )
    blocks: int = option(1, "pre-activation blocks per stage", ge=1)
    norm: Norm = option("layer", "none, layer (GroupNorm with 1 group) or group (GroupNorm with `groups` groups)")
    groups: int = option(4, "groups of the `group` norm (must divide every stage's channels)", ge=1)
    activation: Activation = option("relu", "nonlinearity of the pre-activations")
    loss: Literal["mse", "cross_entropy"] = option("mse", "mse: 1/2 |f(x) - onehot(y)|^2 averaged")

    def check(self, where: str) -> None:
        if not self.channels or min(self.channels) < 1:
            raise SpecError(f"`{where}.channels` = {list(self.channels)} must list at least one positive channel count")
        if self.norm == "group" and any(c % self.groups for c in self.channels):
            raise SpecError(
                f"`{where}.groups` = {self.groups} must divide every entry of `{where}.channels` = "
                f"{list(self.channels)} for norm = 'group'"
            )


def _norm(kind: Norm, groups: int, channels: int, dtype) -> eqx.nn.Identity | eqx.nn.GroupNorm:
    if kind == "none":
        return eqx.nn.Identity()
    return eqx.nn.GroupNorm(1 if kind == "layer" else groups, channels, dtype=dtype)


class PreActBlock(eqx.Module):
    """x -> shortcut(x) + conv2(act(norm2(pool?(conv1(act(norm1(x)))))))."""

    norm1: eqx.nn.Identity | eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    norm2: eqx.nn.Identity | eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    projection: eqx.nn.Conv2d | None
    activation: Callable = eqx.field(static=True)
    downsample: bool = eqx.field(static=True)

    def __init__(self, c_in, c_out, downsample, norm, groups, activation, dtype, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = _norm(norm, groups, c_in, dtype)
        self.conv1 = eqx.nn.Conv2d(c_in, c_out, 3, padding="SAME", dtype=dtype, key=k1)
        self.norm2 = _norm(norm, groups, c_out, dtype)
        self.conv2 = eqx.nn.Conv2d(c_out, c_out, 3, padding="SAME", dtype=dtype, key=k2)
        self.projection = eqx.nn.Conv2d(c_in, c_out, 1, dtype=dtype, key=k3) if c_in != c_out else None
        self.activation, self.downsample = activation, downsample

    def __call__(self, x: Array) -> Array:  # (C_in, H, W) -> (C_out, H', W')
        pre = self.activation(self.norm1(x))
        shortcut = x if self.projection is None else self.projection(pre)
        h = self.conv1(pre)
        if self.downsample:
            h, shortcut = average_pool(h), average_pool(shortcut)
        return shortcut + self.conv2(self.activation(self.norm2(h)))


class ResNet(eqx.Module):
    """stem conv, the pre-activation blocks of every stage, then norm-act-pool-linear."""

    stem: eqx.nn.Conv2d
    blocks: tuple[PreActBlock, ...]
    norm: eqx.nn.Identity | eqx.nn.GroupNorm
    readout: eqx.nn.Linear
    activation: Callable = eqx.field(static=True)

    def __init__(self, image_shape, channels, blocks, norm, groups, outputs, activation, dtype, key):
        keys = iter(jax.random.split(key, 2 + len(channels) * blocks))
        self.stem = eqx.nn.Conv2d(image_shape[0], channels[0], 3, padding="SAME", dtype=dtype, key=next(keys))
        layers, c_in = [], channels[0]
        for stage, c_out in enumerate(channels):
            for b in range(blocks):
                downsample = stage > 0 and b == 0
                layers.append(PreActBlock(c_in, c_out, downsample, norm, groups, activation, dtype, next(keys)))
                c_in = c_out
        self.blocks = tuple(layers)
        self.norm = _norm(norm, groups, c_in, dtype)
        self.readout = eqx.nn.Linear(c_in, outputs, dtype=dtype, key=next(keys))
        self.activation = activation

    def __call__(self, image: Array) -> Array:  # (C, H, W) -> (K,)
        x = self.stem(image)
        for block in self.blocks:
            x = block(x)
        return self.readout(self.activation(self.norm(x)).mean(axis=(1, 2)))


@register_problem(
    "resnet",
    ResNetParams,
    "pre-activation ResNet (norm none/layer/group, 2x2 average-pool downsampling) on an image dataset",
)
def resnet(params: ResNetParams, seed: int, dtype) -> Problem:
    dataset = load_classification(params, seed)
    shape = image_shape(dataset, params.dataset, "resnet")
    if min(shape[1:]) // 2 ** (len(params.channels) - 1) < 1:
        raise SpecError(
            f"`problem.channels` has {len(params.channels)} stages, but {shape[1]}x{shape[2]} images "
            f"vanish after {len(params.channels) - 1} 2x2 poolings"
        )
    model = initialize(
        lambda key: ResNet(
            shape,
            params.channels,
            params.blocks,
            params.norm,
            params.groups,
            params.classes,
            ACTIVATIONS[params.activation],
            dtype,
            key,
        ),
        seed,
    )
    return supervised_problem(
        model,
        dataset,
        params.loss,
        dtype,
        {"dataset": params.dataset, "norm": params.norm, "channels": list(params.channels)},
    )
