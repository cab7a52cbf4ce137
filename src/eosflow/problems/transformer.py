"""A transformer encoder: a ViT on image sets (``vit``) and a token model for sequence tasks (``transformer``).

    tokens   ViT: the image cut into p x p patches, each flattened and mapped linearly to R^D;
             sequences: a token embedding (V + 1 entries) to R^D; plus a learned position embedding
    block    x -> x + MHA(LN(x));  x -> x + W_2 act(W_1 LN(x))      (pre-LN, as in ViT; act = GELU)
    head     ViT: LN, mean over tokens, linear to K logits;
             sequences: LN, linear to V logits at each of the last T positions

Attention is full (bidirectional) softmax attention with ``heads`` heads of size D / heads and no
biases (Equinox's MultiheadAttention); LayerNorm has eps = 1e-5, so the loss is smooth in w.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import SpecError, option
from eosflow.data import ClassificationData, load_classification
from eosflow.data.sequences import (
    SequenceData,
    Task,
    input_length,
    input_vocab,
    load_sequences,
)
from eosflow.problems.networks import (
    ACTIVATIONS,
    Activation,
    image_shape,
    initialize,
    supervised_problem,
)
from eosflow.problems.registry import Problem, register_problem


@dataclasses.dataclass(frozen=True)
class EncoderArchitecture:
    dim: int = option(16, "D, the token width", ge=1)
    depth: int = option(2, "number of encoder blocks", ge=1)
    heads: int = option(2, "attention heads (must divide `dim`)", ge=1)
    mlp_width: int = option(32, "hidden width of each block's MLP", ge=1)
    activation: Activation = option("gelu", "nonlinearity of the blocks' MLPs")
    loss: Literal["mse", "cross_entropy"] = option("mse", "mse: 1/2 |f(x) - onehot(y)|^2 averaged")

    def check(self, where: str) -> None:
        if self.dim % self.heads:
            raise SpecError(f"`{where}.heads` = {self.heads} must divide `{where}.dim` = {self.dim}")


class EncoderBlock(eqx.Module):
    """Pre-LN transformer block on a (T, D) sequence."""

    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    activation: Callable = eqx.field(static=True)

    def __init__(self, dim, heads, mlp_width, activation, dtype, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.attention = eqx.nn.MultiheadAttention(heads, dim, dtype=dtype, key=k1)
        self.norm2 = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.mlp_in = eqx.nn.Linear(dim, mlp_width, dtype=dtype, key=k2)
        self.mlp_out = eqx.nn.Linear(mlp_width, dim, dtype=dtype, key=k3)
        self.activation = activation

    def __call__(self, x: Array) -> Array:  # (T, D) -> (T, D)
        h = jax.vmap(self.norm1)(x)
        x = x + self.attention(h, h, h)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(self.mlp_out)(self.activation(jax.vmap(self.mlp_in)(h)))


class Encoder(eqx.Module):
    """Tokens (T, D) + positions -> blocks -> LN; ``readout`` maps each token to the outputs."""

    positions: eqx.nn.Embedding
    blocks: tuple[EncoderBlock, ...]
    norm: eqx.nn.LayerNorm
    readout: eqx.nn.Linear

    def __init__(self, length, arch: EncoderArchitecture, outputs, dtype, key):
        keys = jax.random.split(key, arch.depth + 2)
        self.positions = eqx.nn.Embedding(length, arch.dim, dtype=dtype, key=keys[0])
        act = ACTIVATIONS[arch.activation]
        self.blocks = tuple(EncoderBlock(arch.dim, arch.heads, arch.mlp_width, act, dtype, k) for k in keys[2:])
        self.norm = eqx.nn.LayerNorm(arch.dim, dtype=dtype)
        self.readout = eqx.nn.Linear(arch.dim, outputs, dtype=dtype, key=keys[1])

    def __call__(self, tokens: Array) -> Array:  # (T, D) -> (T, D) normalized
        x = tokens + self.positions.weight
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.norm)(x)


# ---- ViT on an image set -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ViTParams(EncoderArchitecture, ClassificationData):
    n_train: int = option(64, "training examples", ge=1)
    n_test: int = option(0, "held-out test examples (0: none)", ge=0)
    patch: int = option(2, "p: images are cut into p x p patches (must divide height and width)", ge=1)


def patches(image: Array, p: int) -> Array:
    """(C, H, W) -> (H/p * W/p, C p^2): the p x p patches in row-major order, each flattened (c, i, j)."""
    c, h, w = image.shape
    return image.reshape(c, h // p, p, w // p, p).transpose(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)


class ViT(eqx.Module):
    embed: eqx.nn.Linear
    encoder: Encoder
    patch: int = eqx.field(static=True)

    def __init__(self, image_shape, params: ViTParams, dtype, key):
        c, h, w = image_shape
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Linear(c * params.patch**2, params.dim, dtype=dtype, key=k1)
        self.encoder = Encoder((h // params.patch) * (w // params.patch), params, params.classes, dtype, k2)
        self.patch = params.patch

    def __call__(self, image: Array) -> Array:  # (C, H, W) -> (K,)
        x = self.encoder(jax.vmap(self.embed)(patches(image, self.patch)))
        return self.encoder.readout(x.mean(axis=0))


@register_problem(
    "vit", ViTParams, "vision transformer (patches, pre-LN attention blocks, GELU MLPs) on an image dataset"
)
def vit(params: ViTParams, seed: int, dtype) -> Problem:
    dataset = load_classification(params, seed)
    shape = image_shape(dataset, params.dataset, "vit")
    if shape[1] % params.patch or shape[2] % params.patch:
        raise SpecError(
            f"`problem.patch` = {params.patch} does not divide the {shape[1]}x{shape[2]} images "
            f"of `problem.dataset` = {params.dataset!r}"
        )
    model = initialize(lambda key: ViT(shape, params, dtype, key), seed)
    return supervised_problem(model, dataset, params.loss, dtype, {"dataset": params.dataset})


# ---- transformer on a sequence task --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SequenceTransformerParams(EncoderArchitecture, SequenceData):
    task: Task = option("sorting", "sorting: output sort(s); copying: read s, then T recall tokens, output s")


class SequenceTransformer(eqx.Module):
    embed: eqx.nn.Embedding
    encoder: Encoder
    outputs: int = eqx.field(static=True)

    def __init__(self, params: SequenceTransformerParams, dtype, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(input_vocab(params), params.dim, dtype=dtype, key=k1)
        self.encoder = Encoder(input_length(params), params, params.vocab, dtype, k2)
        self.outputs = params.length

    def __call__(self, tokens: Array) -> Array:  # (T_in,) tokens (as floats) -> (T, V) logits
        x = self.encoder(self.embed.weight[tokens.astype(jnp.int32)])
        return jax.vmap(self.encoder.readout)(x[-self.outputs :])


@register_problem(
    "transformer",
    SequenceTransformerParams,
    "transformer encoder (token embedding, pre-LN attention blocks) on a sorting or copying task",
)
def transformer(params: SequenceTransformerParams, seed: int, dtype) -> Problem:
    model = initialize(lambda key: SequenceTransformer(params, dtype, key), seed)
    return supervised_problem(model, load_sequences(params, seed), params.loss, dtype, {"task": params.task})
