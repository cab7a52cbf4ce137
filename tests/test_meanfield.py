"""The mean-field particle model against independent oracles: the problem's own layout
(split_meanfield), the dense Hessian (the oscillation's linearized generator is eta N H - 2),
the GD update itself, autodiff of the macroscopic free energy, a synthetic period-2 sequence for
GD's measured oscillation, and GD's own iterates at the edge of stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow import meanfield as mf
from eosflow.cli import main
from eosflow.compare import compare_run
from eosflow.config import SpecError
from eosflow.experiment import run
from eosflow.problems.networks import split_meanfield
from eosflow.problems.registry import build_problem
from eosflow.spec import parse_spec

jax.config.update("jax_enable_x64", True)

WIDTH = 6


def _problem():
    problem, _ = build_problem(
        {"name": "two_layer_meanfield", "width": WIDTH, "n_train": 16, "input_dim": 3}, 0, "float64"
    )
    return problem


def test_particle_layout_matches_the_problem():
    problem = _problem()
    particles = mf.to_particles(problem.w0, WIDTH)
    a, weights = split_meanfield(problem.w0, WIDTH)
    np.testing.assert_array_equal(particles[:, 0], a)
    np.testing.assert_array_equal(particles[:, 1:], weights)
    np.testing.assert_array_equal(mf.to_flat(particles), problem.w0)


def test_velocity_against_gd_and_the_dense_hessian():
    """With delta = 0 the centres move like GD in mean-field time (-eta N g); for a small delta the
    oscillation's rate is (eta N H - 2) delta (the linearized two-step map near lr S = 2)."""
    problem = _problem()
    eta = 0.7
    p = mf.to_particles(problem.w0, WIDTH)
    rates, observed = mf.velocity(problem.objective, mf.Particles(p, jnp.zeros_like(p)), eta)
    gd_rate = -eta * WIDTH * problem.objective.grad(problem.w0)
    np.testing.assert_allclose(mf.to_flat(rates.centres), gd_rate, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(observed.averaged_risk, problem.objective.value(problem.w0), rtol=1e-12)
    direction = np.random.default_rng(0).standard_normal(problem.w0.size)
    hessian = np.asarray(problem.objective.hessian(problem.w0))
    for scale in (1e-2, 1e-3):  # the secant's error is O(delta^3)
        delta = scale * direction
        rates, _ = mf.velocity(problem.objective, mf.Particles(p, mf.to_particles(jnp.asarray(delta), WIDTH)), eta)
        expected = eta * WIDTH * hessian @ delta - 2.0 * delta
        np.testing.assert_allclose(mf.to_flat(rates.oscillation), expected, rtol=0, atol=20 * scale**3)


def test_gd_oscillation_recovers_a_period_two_sequence():
    rng = np.random.default_rng(1)
    centre, drift, delta = (rng.standard_normal((4, 3)) for _ in range(3))
    k = np.arange(10)[:, None, None]
    iterates = centre + k * drift + (-1.0) ** k * delta
    centres, oscillation = mf.gd_oscillation(iterates)
    np.testing.assert_allclose(oscillation, np.broadcast_to(delta, oscillation.shape), atol=1e-12)
    np.testing.assert_allclose(centres, (centre + k * drift)[1:-1], atol=1e-12)


def test_particle_gd_is_gd_with_lr_n_eta():
    problem = _problem()
    eta = 0.5
    particles, losses = mf.particle_gd(problem.objective, problem.w0, WIDTH, eta, 3)
    w = problem.w0
    for step in range(3):
        np.testing.assert_allclose(losses[step], problem.objective.value(w), rtol=1e-12)
        w = w - WIDTH * eta * problem.objective.grad(w)
    np.testing.assert_allclose(mf.to_flat(particles[-1]), w, rtol=1e-12)


def test_the_particle_velocities_are_the_gradients_of_the_macroscopic_free_energy():
    """v_p = -eta N dFF/dp_i and v_delta = +eta N dFF/ddelta_i, with FF differentiated by autodiff:
    the particle model is a W2 descent in p and ascent in delta of FF (docs/meanfield.md)."""
    problem = _problem()
    eta = 0.7
    rng = np.random.default_rng(2)
    p = mf.to_particles(problem.w0, WIDTH)
    delta = jnp.asarray(0.1 * rng.standard_normal(p.shape))

    def free_energy(p, delta):
        return mf.velocity(problem.objective, mf.Particles(p, delta), eta)[1].free_energy

    d_p, d_delta = jax.grad(free_energy, argnums=(0, 1))(p, delta)
    rates, _ = mf.velocity(problem.objective, mf.Particles(p, delta), eta)
    np.testing.assert_allclose(rates.centres, -eta * WIDTH * d_p, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(rates.oscillation, eta * WIDTH * d_delta, rtol=1e-10, atol=1e-13)


def test_the_particle_model_tracks_gd_at_the_edge_of_stability():
    """Pure-noise targets keep GD at the edge of stability (lr S ~ 2) while it memorizes them; over
    steps 30..400 the model's RMS oscillation and two-step-averaged loss stay within 10% of GD's
    (`benchmarks/meanfield.py --widths 64 --steps 400`: -1.9% and -4.3%)."""
    width, eta, steps = 64, 4.0, 400
    problem, _ = build_problem(
        {"name": "two_layer_meanfield", "width": width, "n_train": 512, "dataset": "gaussian", "input_dim": 8},
        0,
        "float64",
    )
    iterates, losses = mf.particle_gd(problem.objective, problem.w0, width, eta, steps + 1)
    _, observed, _ = mf.particle_model(problem.objective, problem.w0, width, eta, steps)
    _, delta = mf.gd_oscillation(np.asarray(iterates))
    window = slice(30, steps - 1)  # k = 31 .. steps - 1
    gd_envelope = np.sqrt(np.mean(np.sum(delta**2, axis=2), axis=1))[window]
    losses = np.asarray(losses)
    gd_loss = 0.5 * (losses[1:steps] + losses[2 : steps + 1])[window]
    model = mf.macroscopic(observed)
    assert gd_envelope.min() > 0.05  # GD oscillates throughout: this is the edge of stability
    np.testing.assert_allclose(np.mean(model["amplitude"][1:steps][window]), np.mean(gd_envelope), rtol=0.1)
    np.testing.assert_allclose(np.mean(model["averaged_risk"][1:steps][window]), np.mean(gd_loss), rtol=0.1)


def test_the_particle_model_process_follows_gd_in_a_run(tmp_path):
    """`particle_model` in a run beside GD: its rows are the particle model's macroscopic curves
    (FF, the two-step loss, |delta| = sqrt(N) x the RMS per particle), and the comparison scores
    it against GD's own iterates: loss and envelope errors within 15% (measured 8.4%, 8.0%)."""
    width, eta, steps = 64, 4.0, 400
    problem_table = {
        "name": "two_layer_meanfield",
        "width": width,
        "n_train": 512,
        "dataset": "gaussian",
        "input_dim": 8,
    }
    spec = {
        "name": "particles",
        "steps": steps,
        "lr": width * eta,
        "dtype": "float64",
        "problem": problem_table,
        "processes": ["gd", "particle_model"],
        "particle_model": {"substeps": 4, "courant": 1e3},
        "spectrum": {"k": 1, "k_max": 1},
        "record": {"chunk": 200},
    }
    run(spec, tmp_path / "run")
    ds = eosflow.load(tmp_path / "run").sel(process="particle_model")
    problem, _ = build_problem(problem_table, 0, "float64")
    _, observed, _ = mf.particle_model(problem.objective, problem.w0, width, eta, steps)
    expected = mf.macroscopic(observed)
    np.testing.assert_allclose(ds["predicted_loss"].values, expected["averaged_risk"], rtol=1e-9)
    np.testing.assert_allclose(ds["free_energy"].values, expected["free_energy"], rtol=1e-9)
    np.testing.assert_allclose(ds["amplitude"].values, np.sqrt(width) * expected["amplitude"], rtol=1e-9)
    scores = compare_run(tmp_path / "run").loc["particle_model"]
    assert scores["loss_error"] < 0.15 and scores["envelope_error"] < 0.15


def test_the_particle_model_refuses_other_problems_and_says_so_in_the_listing(capsys):
    with pytest.raises(
        SpecError,
        match="process 'particle_model' models the problem 'two_layer_meanfield'; this spec's `problem.name` is 'mlp'",
    ):
        parse_spec({"processes": ["gd", "particle_model"], "problem": {"name": "mlp"}})
    assert main(["processes"]) == 0
    listing = capsys.readouterr().out
    assert "(problem two_layer_meanfield only)" in listing.split("[particle_model]")[1].splitlines()[0]
