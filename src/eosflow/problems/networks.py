"""Neural-network problems: MLPs, a small CNN and the mean-field two-layer network, on a dataset.

Every network maps ONE example to its outputs and is vmapped over the batch; its parameters are
raveled once into the flat vector w (``Problem.objective.unravel`` maps back). Losses (see
``eosflow.objective``): ``mse`` = mean_i 1/2 |f(x_i) - y_i|^2 (one-hot y for classification),
``sse`` = mean_i |f(x_i) - y_i|^2, ``cross_entropy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.config import SpecError, option
from eosflow.data import ClassificationData, Dataset, RegressionData, load_classification, load_regression, one_hot
from eosflow.objective import Objective
from eosflow.problems.registry import Problem, register_problem

M = TypeVar("M", bound=eqx.Module)

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
}
Activation = Literal["tanh", "relu", "gelu", "swish"]


# ---- shared plumbing ---------------------------------------------------------------------------
def accuracy(model_fn, unravel):
    def accuracy_of(w, data):
        inputs, labels = data
        logits = model_fn(unravel(w), inputs)
        if labels.ndim == logits.ndim:  # one-hot rows
            labels = jnp.argmax(labels, axis=-1)
        return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

    return accuracy_of


def supervised_problem(model: eqx.Module, dataset: Dataset, loss: str, dtype, info: dict) -> Problem:
    """A Problem for ``model`` (an Equinox module mapping one example to its outputs) on ``dataset``.

    Classification datasets (``num_classes`` = K) get one-hot targets under ``mse``/``sse``, integer
    labels under ``cross_entropy``, and an accuracy; regression datasets keep their float targets.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return model_problem(_BatchedModel(static), params, dataset, loss, dtype, info)


classification_problem = supervised_problem  # the name the first MLP used


def model_problem(apply: Callable, params, dataset: Dataset, loss: str, dtype, info: dict) -> Problem:
    """A Problem for ``apply(params, inputs) -> outputs`` (batched) on ``dataset`` (see supervised_problem)."""
    classes = dataset.num_classes
    if classes is not None and loss != "cross_entropy":

        def targets(y):
            return one_hot(y, classes)
    else:

        def targets(y):
            return y

    train = (jnp.asarray(dataset.x_train, dtype), jnp.asarray(targets(dataset.y_train), dtype))
    objective, w0 = Objective.from_model(apply, params, *train, loss=loss)
    test_objective = None
    if len(dataset.y_test):
        test = (jnp.asarray(dataset.x_test, dtype), jnp.asarray(targets(dataset.y_test), dtype))
        test_objective = objective.with_data(test)
    info = {
        **info,
        "n_train": int(len(dataset.y_train)),
        "n_test": int(len(dataset.y_test)),
        "parameters": int(w0.size),
    }
    return Problem(
        objective,
        w0.astype(dtype),
        test_objective,
        accuracy(apply, objective.unravel) if classes is not None else None,
        classes,
        info,
    )


class _BatchedModel(eqx.Module):
    static: eqx.Module = eqx.field(static=True)

    def __call__(self, params, inputs):
        model = eqx.combine(params, self.static)
        return jax.vmap(model)(inputs)


def initialize(build: Callable[[Array], M], seed: int) -> M:
    """``build(key)``'s architecture with Equinox's default distributions, drawn by numpy.

    Every Linear/Conv layer gets weights and biases uniform in +-1/sqrt(fan_in) (fan_in = inputs
    x kernel size), as Equinox draws them, but from ``numpy.random.default_rng(seed)``: building
    the module under ``eval_shape`` compiles nothing, which makes problems quick to set up. As in
    Equinox, an LSTM cell's weights and bias are uniform in +-1/sqrt(hidden), an Embedding's
    entries standard normal, and LayerNorm/GroupNorm start as the identity (scale 1, shift 0).
    A parameter of any other layer is an error naming it.
    """
    rng = np.random.default_rng([seed, 11])
    layers = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.LSTMCell, eqx.nn.Embedding, eqx.nn.LayerNorm, eqx.nn.GroupNorm)

    def uniform(leaf, bound):
        return None if leaf is None else jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

    def draw(layer):
        if isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv)):
            bound = 1.0 / np.sqrt(np.prod(layer.weight.shape[1:]))
            names = ("weight", "bias")
        elif isinstance(layer, eqx.nn.LSTMCell):
            bound, names = 1.0 / np.sqrt(layer.hidden_size), ("weight_ih", "weight_hh", "bias")
        elif isinstance(layer, eqx.nn.Embedding):
            return eqx.tree_at(
                lambda m: m.weight, layer, jnp.asarray(rng.standard_normal(layer.weight.shape), layer.weight.dtype)
            )
        elif isinstance(layer, (eqx.nn.LayerNorm, eqx.nn.GroupNorm)):
            for name, fill in (("weight", jnp.ones), ("bias", jnp.zeros)):
                leaf = getattr(layer, name)
                if leaf is not None:
                    layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, fill(leaf.shape, leaf.dtype))
            return layer
        else:
            return layer
        for name in names:
            leaf = getattr(layer, name)
            if leaf is not None:
                layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, uniform(leaf, bound))
        return layer

    shapes = eqx.filter_eval_shape(build, jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(draw, shapes, is_leaf=lambda node: isinstance(node, layers))
    undrawn = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(model)
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if undrawn:
        raise TypeError(f"initialize does not know how to draw the parameters {', '.join(undrawn)}")
    return model


@dataclasses.dataclass(frozen=True)
class MLPArchitecture:
    width: int = option(64, "hidden width", ge=1)
    depth: int = option(2, "number of hidden layers", ge=1)
    activation: Activation = option("tanh", "hidden nonlinearity")
    bias: bool = option(True, "use biases")


def _mlp(in_size: int, out_size: int, arch: MLPArchitecture, dtype, seed: int) -> eqx.nn.MLP:
    return initialize(
        lambda key: eqx.nn.MLP(
            in_size,
            out_size,
            arch.width,
            arch.depth,
            activation=ACTIVATIONS[arch.activation],
            use_bias=arch.bias,
            use_final_bias=arch.bias,
            dtype=dtype,
            key=key,
        ),
        seed,
    )


# ---- MLP on a classification set ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MLPParams(MLPArchitecture, ClassificationData):
    loss: Literal["mse", "cross_entropy"] = option("mse", "mse: 1/2 |f(x) - onehot(y)|^2 averaged")


@register_problem("mlp", MLPParams, "multilayer perceptron on a classification dataset (MSE or CE)")
def mlp(params: MLPParams, seed: int, dtype) -> Problem:
    dataset = load_classification(params, seed).flat()
    model = _mlp(dataset.x_train.shape[1], params.classes, params, dtype, seed)
    return supervised_problem(model, dataset, params.loss, dtype, {"dataset": params.dataset})


# ---- MLP on a regression set (the central-flow reference problem) -------------------------------
@dataclasses.dataclass(frozen=True)
class MLPRegressionParams(MLPArchitecture, RegressionData):
    width: int = option(16, "hidden width", ge=1)
    activation: Activation = option("swish", "hidden nonlinearity")
    loss: Literal["mse", "sse"] = option("sse", "sse: mean_i |f(x_i) - y_i|^2; mse: half of it")


@register_problem(
    "mlp_regression",
    MLPRegressionParams,
    "MLP on a regression set; defaults: swish 8-16-16-4 on 128 Gaussian inputs/targets, SSE (484 parameters)",
)
def mlp_regression(params: MLPRegressionParams, seed: int, dtype) -> Problem:
    dataset = load_regression(params, seed).flat()
    model = _mlp(dataset.x_train.shape[1], dataset.y_train.shape[1], params, dtype, seed)
    return supervised_problem(model, dataset, params.loss, dtype, {"dataset": params.dataset})


def average_pool(x: Array) -> Array:
    """2x2 average pooling of a (C, H, W) map (an odd last row or column is dropped)."""
    c, h, w = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def image_shape(dataset: Dataset, name: str, network: str) -> tuple[int, int, int]:
    """(C, H, W) of the dataset's examples, or a SpecError naming the dataset when they are not images."""
    shape = dataset.x_train.shape[1:]
    if len(shape) != 3:
        raise SpecError(
            f"`problem.dataset` = {name!r} is not an image dataset (examples have shape {shape}); "
            f"the {network} needs channels x height x width images (digits, cifar10)"
        )
    return shape


# ---- a small CNN on an image set ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CNNParams(ClassificationData):
    channels: tuple[int, ...] = option(
        (8, 16), "output channels of each conv layer (each followed by 2x2 average pooling)"
    )
    kernel: int = option(3, "square kernel size of every conv layer ('same' padding)", ge=1)
    activation: Activation = option("tanh", "nonlinearity after each conv layer")
    bias: bool = option(True, "use biases")
    loss: Literal["mse", "cross_entropy"] = option("mse", "mse: 1/2 |f(x) - onehot(y)|^2 averaged")

    def check(self, where: str) -> None:
        if not self.channels or min(self.channels) < 1:
            raise SpecError(f"`{where}.channels` = {list(self.channels)} must list at least one positive channel count")


class SmallCNN(eqx.Module):
    """[conv k x k ('same') -> activation -> 2x2 average pool] per layer, then a linear readout."""

    convs: tuple[eqx.nn.Conv2d, ...]
    readout: eqx.nn.Linear
    activation: Callable = eqx.field(static=True)

    def __init__(self, image_shape, channels, kernel, outputs, activation, bias, dtype, key):
        in_channels, height, width = image_shape
        keys = jax.random.split(key, len(channels) + 1)
        convs = []
        for i, out_channels in enumerate(channels):
            convs.append(
                eqx.nn.Conv2d(
                    in_channels, out_channels, kernel, padding="SAME", use_bias=bias, dtype=dtype, key=keys[i]
                )
            )
            in_channels, height, width = out_channels, height // 2, width // 2
        self.convs = tuple(convs)
        self.readout = eqx.nn.Linear(in_channels * height * width, outputs, use_bias=bias, dtype=dtype, key=keys[-1])
        self.activation = activation

    def __call__(self, image: Array) -> Array:
        for conv in self.convs:
            image = average_pool(self.activation(conv(image)))
        return self.readout(image.reshape(-1))


@register_problem("cnn", CNNParams, "small CNN (conv-activation-avgpool blocks, linear readout) on an image dataset")
def cnn(params: CNNParams, seed: int, dtype) -> Problem:
    dataset = load_classification(params, seed)
    shape = image_shape(dataset, params.dataset, "cnn")
    smallest = min(shape[1:]) // 2 ** len(params.channels)
    if smallest < 1:
        raise SpecError(
            f"`problem.channels` has {len(params.channels)} layers, but {shape[1]}x{shape[2]} images vanish after "
            f"{len(params.channels)} 2x2 poolings; use at most {int(np.log2(min(shape[1:])))} layers"
        )
    model = initialize(
        lambda key: SmallCNN(
            shape,
            params.channels,
            params.kernel,
            params.classes,
            ACTIVATIONS[params.activation],
            params.bias,
            dtype,
            key,
        ),
        seed,
    )
    return supervised_problem(model, dataset, params.loss, dtype, {"dataset": params.dataset})


# ---- the mean-field two-layer network ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeanFieldParams(RegressionData):
    dataset: str = option("teacher", "regression dataset with one target (`eosflow problems` lists them)")
    outputs: int = option(1, "target dimension (the mean-field network has one output)", ge=1, le=1)
    width: int = option(256, "N, the number of neurons (particles)", ge=1)
    activation: Activation = option("tanh", "sigma")
    init_scale: float = option(1.0, "a_i ~ init_scale * N(0, 1); w_i ~ N(0, I/D)", gt=0)
    loss: Literal["mse", "sse"] = option("mse", "mse: mean_i 1/2 (f(x_i) - y_i)^2")


def split_meanfield(w: Array, width: int) -> tuple[Array, Array]:
    """The flat parameters (a_1..a_N, w_1..w_N) as (a (N,), W (N, D)) with W's rows the w_i."""
    return w[:width], w[width:].reshape(width, -1)


class MeanFieldNetwork(eqx.Module):
    """f(x) = (1/N) sum_i a_i sigma(w_i . x), batched: sigma(X W^T) a / N, one output column."""

    activation: Callable = eqx.field(static=True)

    def __call__(self, params: tuple[Array, Array], inputs: Array) -> Array:
        a, weights = params
        return (self.activation(inputs @ weights.T) @ a / a.shape[0])[:, None]


@register_problem(
    "two_layer_meanfield",
    MeanFieldParams,
    "f(x) = (1/N) sum_i a_i sigma(w_i . x) on a regression set; w = (a_1..a_N, w_1..w_N)",
)
def two_layer_meanfield(params: MeanFieldParams, seed: int, dtype) -> Problem:
    dataset = load_regression(params, seed).flat()
    if dataset.y_train.shape[1] != 1:
        raise SpecError(
            f"`problem.dataset` = {params.dataset!r} has {dataset.y_train.shape[1]} targets; "
            "the mean-field network needs one (gaussian, teacher, diabetes)"
        )
    dim = dataset.x_train.shape[1]
    rng = np.random.default_rng([seed, 12])
    a = jnp.asarray(params.init_scale * rng.standard_normal(params.width), dtype)
    weights = jnp.asarray(rng.standard_normal((params.width, dim)) / np.sqrt(dim), dtype)
    info = {
        "dataset": params.dataset,
        "width": params.width,
        "input_dim": dim,
        "layout": "w = (a_1..a_N, w_1..w_N), w_i in R^D contiguous",
    }
    return model_problem(
        MeanFieldNetwork(ACTIVATIONS[params.activation]), (a, weights), dataset, params.loss, dtype, info
    )
