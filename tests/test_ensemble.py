import pytest
import torch

from orchestrator.ensemble import STRATEGIES, Ensemble, Routing
from orchestrator.modalities.image.router import RouterNet
from orchestrator.modalities.image.sampling import (
    ClassifierRouter,
    SampleRequest,
    add_velocities,
    sample,
    sample_requests,
    velocity,
)
from worker.models import build_model


def small_expert(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("unet", image_channels=1, channels=8, channel_mult=[1, 2], patch=1)
    for parameter in model.parameters():  # the output layer starts at zero: perturb it
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture
def ensemble():
    torch.manual_seed(0)
    router = RouterNet(image_channels=1, clusters=3, channels=8).eval()
    return Ensemble([small_expert(k) for k in range(3)], ClassifierRouter(router),
                    add_velocities)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_weights_are_normalised_and_sparse_as_promised(ensemble, strategy):
    x, t = torch.randn(10, 1, 8, 8), torch.rand(10)
    weights = ensemble.route((x, t), Routing(strategy, 2))
    assert weights.shape == (10, 3)
    assert torch.allclose(weights.sum(1), torch.ones(10), atol=1e-6)
    assert (weights >= 0).all()
    nonzero = (weights > 0).sum(1)
    expected = {"top1": 1, "topk": 2, "full": 3}[strategy]
    assert (nonzero == expected).all()


def test_top1_picks_the_router_argmax(ensemble):
    x, t = torch.randn(6, 1, 8, 8), torch.rand(6)
    probs = ensemble.probabilities(x, t)
    weights = ensemble.route((x, t), Routing("top1"))
    assert torch.equal(weights.argmax(1), probs.argmax(1))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_grouped_velocity_equals_per_sample_mixture(ensemble, strategy):
    x, t = torch.randn(7, 1, 8, 8), torch.rand(7)
    weights = ensemble.route((x, t), Routing(strategy, 2))
    ensemble.expert_rows = 0
    grouped = velocity(ensemble, x, t, Routing(strategy, 2))
    with torch.no_grad():
        reference = torch.stack([
            sum(weights[i, k] * ensemble.experts[k](x[i : i + 1], t[i : i + 1])[0]
                for k in range(3)) for i in range(7)])
    assert torch.allclose(grouped, reference, atol=1e-5)
    # Each expert ran once, on only the rows routed to it.
    assert ensemble.expert_rows == int((weights > 0).sum())


def test_full_with_one_expert_equals_that_expert():
    expert = small_expert(1)
    ensemble = Ensemble([expert], None, add_velocities)
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    with torch.no_grad():
        assert torch.equal(velocity(ensemble, x, t, Routing("full")), expert(x, t))
    noise = torch.randn(4, 1, 8, 8)
    from worker.flow import euler_sample
    # Bit for bit: the request path does the same arithmetic as a plain Euler loop.
    assert torch.equal(sample(ensemble, noise, 3, Routing("full")), euler_sample(expert, noise, 3))


def test_router_output_shape():
    router = RouterNet(image_channels=1, clusters=5, channels=8)
    assert router(torch.randn(3, 1, 28, 28), torch.rand(3)).shape == (3, 5)
    assert router(torch.randn(3, 1, 7, 7), torch.rand(3)).shape == (3, 5)


def test_several_experts_without_router_is_refused():
    with pytest.raises(ValueError, match="needs a router"):
        Ensemble([small_expert(0), small_expert(1)], None, add_velocities)


def test_routing_everything_to_one_expert_runs_only_that_expert(ensemble):
    with torch.no_grad():
        ensemble.router.net.head.bias.copy_(torch.tensor([0.0, 1e4, 0.0]))  # always expert 1
    x, t = torch.randn(6, 1, 8, 8), torch.rand(6)
    ensemble.expert_rows = 0
    with torch.no_grad():
        assert torch.allclose(velocity(ensemble, x, t, Routing("top1")), ensemble.experts[1](x, t))
    assert ensemble.expert_rows == 6


def test_empty_batch_gives_an_empty_velocity():
    ensemble = Ensemble([small_expert(0)], None, add_velocities)
    empty = velocity(ensemble, torch.randn(0, 1, 8, 8), torch.rand(0), Routing("full"))
    assert empty.shape == (0, 1, 8, 8)


def test_sample_returns_an_ordinary_tensor(ensemble):
    samples = sample(ensemble, torch.randn(4, 1, 8, 8), 2, Routing("top1"))
    assert not samples.is_inference()
    samples.add_(1.0)  # callers may modify it in place


def test_router_pads_odd_sizes_with_zeros():
    router = RouterNet(image_channels=1, clusters=3, channels=8).eval()
    x, t = torch.randn(2, 1, 7, 7), torch.rand(2)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
        assert torch.equal(router(x, t), router(padded, t))


@pytest.mark.parametrize("patch", [2, 4])
def test_router_restores_with_the_patch_it_was_trained_with(patch):
    from safetensors.torch import save as save_tensors

    from orchestrator.modalities.image.router import load_router

    torch.manual_seed(0)
    router = RouterNet(image_channels=1, clusters=3, channels=8, patch=patch).eval()
    meta = {"image_channels": 1, "clusters": 3, "channels": 8, "patch": patch}
    restored = load_router(save_tensors(router.state_dict()), meta)
    x, t = torch.randn(2, 1, 30, 30), torch.rand(2)  # 30 is no multiple of 4: padded
    with torch.no_grad():
        assert torch.equal(restored(x, t), router(x, t))
    assert restored.stem.in_channels == patch * patch


def test_router_saved_without_a_patch_is_read_as_patch_2():
    from safetensors.torch import save as save_tensors

    from orchestrator.modalities.image.router import load_router

    router = RouterNet(image_channels=1, clusters=3, channels=8, patch=2)
    restored = load_router(save_tensors(router.state_dict()),
                           {"image_channels": 1, "clusters": 3, "channels": 8})
    assert restored.patch == 2


def test_one_call_mixes_rows_with_different_routings(ensemble):
    """Per-row routing: one engine call over rows of three requests gives what three calls
    with one routing each give."""
    x, t = torch.randn(9, 1, 8, 8), torch.rand(9)
    routings = [Routing("top1")] * 3 + [Routing("topk", 2)] * 3 + [Routing("full")] * 3
    ensemble.expert_rows = 0
    together = velocity(ensemble, x, t, routings)
    calls = ensemble.expert_rows
    apart = torch.cat([velocity(ensemble, x[i : i + 3], t[i : i + 3], routings[i])
                       for i in (0, 3, 6)])
    assert torch.allclose(together, apart, atol=1e-5)
    assert calls == 3 * 1 + 3 * 2 + 3 * 3  # each row ran only the experts its routing keeps


def test_requests_sampled_together_match_each_sampled_alone(ensemble):
    """Step-level batching: requests with their own strategy, k, seed and number of steps,
    advanced one engine call per step, give each request's own samples."""
    requests = [SampleRequest(2, 3, Routing("top1"), seed=1),
                SampleRequest(1, 5, Routing("topk", 2), seed=2),
                SampleRequest(3, 2, Routing("full"), seed=3)]
    together = sample_requests(ensemble, (1, 8, 8), requests)
    for request, got in zip(requests, together, strict=True):
        noise = torch.randn((request.count, 1, 8, 8),
                            generator=torch.Generator().manual_seed(request.seed))
        alone = sample(ensemble, noise, request.steps, request.routing)
        assert got.shape == alone.shape
        assert torch.allclose(got, alone, atol=1e-5)


def test_a_request_joining_between_steps_gets_its_own_samples(ensemble):
    from orchestrator.modalities.image.sampling import Denoising

    first, late = SampleRequest(2, 4, Routing("full"), seed=1), SampleRequest(1, 3, Routing(
        "top1"), seed=9)
    flight = Denoising(ensemble, (1, 8, 8), [first])
    with torch.inference_mode():
        flight.step()
        flight.step()
        joined = flight.add(late)  # joins with its own t = 1 while the first is half done
        while not flight.finished:
            flight.step()
    for request, got in ((first, flight.walks[0].x), (late, joined.x)):
        alone = sample_requests(ensemble, (1, 8, 8), [request])[0]
        assert torch.allclose(got, alone, atol=1e-5)


def test_strategies_come_from_one_registry(ensemble):
    from orchestrator.ensemble.strategies import register_strategy
    from runstore.errors import InputError

    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with pytest.raises(InputError, match="unknown 'last'"):
        ensemble.route((x, t), Routing("last"))
    register_strategy("last", lambda probs, k: torch.zeros_like(probs).index_fill_(1,
                      torch.tensor([probs.shape[1] - 1]), 1.0))
    try:
        assert torch.allclose(velocity(ensemble, x, t, Routing("last")),
                              ensemble.experts[2](x, t))
    finally:
        STRATEGIES.pop("last")
