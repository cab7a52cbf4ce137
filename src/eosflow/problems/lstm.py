"""An LSTM on a sequence task (sorting or copying of tokens, ``eosflow.data.sequences``).

    e_t = E[x_t]                                  token embedding (V + 1 entries, for the recall token)
    (h_t, c_t) = LSTMCell(e_t, (h_{t-1}, c_t-1))  gates i, f, o = sigmoid(.), g = tanh(.);
                                                  c_t = f c_{t-1} + i g, h_t = o tanh(c_t); h_0 = c_0 = 0
    logits_t = W h_t + b                          at the last T positions (V-way each)

One layer, unidirectional (the copying task is solvable by it; sorting needs the whole input
before the first output and is better suited to the transformer). Smooth (sigmoid and tanh).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.data.sequences import SequenceData, input_vocab, load_sequences
from eosflow.problems.networks import initialize, supervised_problem
from eosflow.problems.registry import Problem, register_problem


@dataclasses.dataclass(frozen=True)
class LSTMParams(SequenceData):
    hidden: int = option(32, "hidden (and cell) size of the LSTM", ge=1)
    embedding: int = option(8, "token embedding size", ge=1)
    loss: Literal["mse", "cross_entropy"] = option("mse", "mse: 1/2 |f(x) - onehot(y)|^2 averaged")


class LSTM(eqx.Module):
    embed: eqx.nn.Embedding
    cell: eqx.nn.LSTMCell
    readout: eqx.nn.Linear
    outputs: int = eqx.field(static=True)

    def __init__(self, params: LSTMParams, dtype, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(input_vocab(params), params.embedding, dtype=dtype, key=k1)
        self.cell = eqx.nn.LSTMCell(params.embedding, params.hidden, dtype=dtype, key=k2)
        self.readout = eqx.nn.Linear(params.hidden, params.vocab, dtype=dtype, key=k3)
        self.outputs = params.length

    def __call__(self, tokens: Array) -> Array:  # (T_in,) tokens (as floats) -> (T, V) logits
        inputs = self.embed.weight[tokens.astype(jnp.int32)]
        zero = jnp.zeros(self.cell.hidden_size, inputs.dtype)

        def step(state, x):
            state = self.cell(x, state)
            return state, state[0]

        _, hidden = jax.lax.scan(step, (zero, zero), inputs)
        return jax.vmap(self.readout)(hidden[-self.outputs :])


@register_problem(
    "lstm", LSTMParams, "one-layer LSTM (token embedding, per-position readout) on a copying or sorting task"
)
def lstm(params: LSTMParams, seed: int, dtype) -> Problem:
    model = initialize(lambda key: LSTM(params, dtype, key), seed)
    return supervised_problem(model, load_sequences(params, seed), params.loss, dtype, {"task": params.task})
