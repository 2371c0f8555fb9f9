import pytest
import torch

from components.quantizers import VectorQuantizer, VQConfig, kmeans, nearest_codes
from components.tokenizers.blocks import ConvShape


def test_nearest_code_on_hand_built_codebook():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    z = torch.tensor([[0.1, -0.1], [0.9, 0.2], [-0.2, 1.3], [4.0, 4.5], [0.5, 0.0]])
    # The last point is equidistant from codes 0 and 1: ties go to the lowest index.
    assert nearest_codes(z, codebook).tolist() == [0, 1, 2, 3, 0]


def test_chunked_search_equals_unchunked_reference():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    reference = torch.cdist(z, codebook).argmin(dim=1)
    assert torch.equal(nearest_codes(z, codebook, chunk_size=7), reference)
    assert torch.equal(nearest_codes(z, codebook, chunk_size=4096), reference)


@pytest.mark.parametrize("ema", [True, False])
def test_quantized_equals_codes_and_straight_through_gradient(ema):
    vq = VQConfig(codebook_size=8, ema=ema).build(4).train()
    z = torch.randn(2, 3, 3, 4, requires_grad=True)
    out = vq(z)
    assert out.indices.shape == (2, 3, 3) and out.indices.dtype == torch.int64
    assert ((out.indices >= 0) & (out.indices < 8)).all()
    assert torch.allclose(vq.indices_to_codes(out.indices), out.quantized)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    # Straight-through: d(quantized)/dz is the identity, so z's gradient is the upstream one.
    assert torch.allclose(z.grad, upstream)


def test_gradient_reaches_encoder():
    from components.tokenizers import VQVAE

    model = VQVAE(VQConfig(codebook_size=8), ConvShape(8, 1, 1, 4)).train()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out = model(x)
    ((out.reconstruction - x) ** 2).mean().add(out.quant_loss).backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_ema_moves_codes_to_cluster_means():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    vq = VQConfig(codebook_size=4, decay=0.9, restart_after_steps=0).build(2).train()
    # Start each code near (not at) its cluster so the assignment is fixed and only EMA acts.
    vq.codebook.copy_(centres * 0.5)
    vq.initialized.fill_(True)
    for _ in range(200):
        z = centres[torch.randint(0, 4, (256,))] + 0.3 * torch.randn(256, 2)
        vq(z.view(1, 256, 2))
    assert torch.allclose(vq.codebook, centres, atol=0.1)


def _kill(vq: VectorQuantizer, which: slice) -> None:
    """Move codes far from any data, vectors and EMA statistics alike (the EMA recomputes the
    vectors from the statistics, so moving only the vectors would be undone at the next step)."""
    vq.codebook[which] = 100.0
    vq.embed_sum[which] = 100.0 * vq.cluster_size[which].unsqueeze(1)


def test_dead_codes_are_restarted_with_their_statistics():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=8, restart_after_steps=3).build(2).train()
    data = lambda: torch.randn(1, 128, 2)  # noqa: E731
    vq(data())
    # Push five codes far from any data: they die, and must come back into the data.
    _kill(vq, slice(3, None))
    usage_before = vq(data()).stats["codebook_usage"].item()
    for _ in range(5):
        out = vq(data())
    assert usage_before <= 3 / 8 * 100 + 1e-6
    assert vq.codebook.abs().max() < 10
    assert out.stats["codebook_usage"].item() > usage_before
    # The EMA statistics were reset with the vectors: no stale sum drags a code back out.
    assert (vq.embed_sum / vq.cluster_size.clamp(min=1e-6).unsqueeze(1)).abs().max() < 10


def test_without_restart_dead_codes_stay_dead():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=8, restart_after_steps=0).build(2).train()
    vq(torch.randn(1, 128, 2))
    _kill(vq, slice(3, None))
    for _ in range(5):
        vq(torch.randn(1, 128, 2))
    assert (vq.codebook[3:] > 50).all()


def test_non_finite_encoder_output_is_refused():
    vq = VQConfig(codebook_size=4).build(2).train()
    z = torch.randn(1, 4, 2)
    z[0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        vq(z)


def test_eval_is_deterministic_and_does_not_update():
    vq = VQConfig(codebook_size=8).build(4).train()
    vq(torch.randn(1, 64, 4))
    vq.eval()
    before = vq.codebook.clone()
    z = torch.randn(2, 5, 4)
    assert torch.equal(vq(z).indices, vq(z).indices)
    assert torch.equal(vq.codebook, before)


def _mixture(n: int, centres: torch.Tensor, spread: float = 0.1) -> torch.Tensor:
    return centres[torch.randint(0, len(centres), (n,))] + spread * torch.randn(n, centres.shape[1])


def test_kmeans_reaches_a_fixed_point_of_lloyd():
    """Converged k-means: every centroid is the mean of the points nearest to it."""
    torch.manual_seed(0)
    data = _mixture(2000, torch.randn(6, 3) * 4)
    centroids, counts = kmeans(data, 6, iters=30, chunk_size=128)
    assign = nearest_codes(data, centroids)
    assert torch.equal(torch.bincount(assign, minlength=6).float(), counts)
    for k in range(6):
        if counts[k] > 0:
            assert torch.allclose(centroids[k], data[assign == k].mean(0), atol=1e-5)


def _distortion(vq: VectorQuantizer, z: torch.Tensor) -> float:
    vq.eval()
    return (vq(z).quantized - z).pow(2).mean().item()


def test_kmeans_init_quantizes_better_than_random_encoder_outputs():
    torch.manual_seed(0)
    z = _mixture(4096, torch.randn(32, 8) * 3, spread=0.5).view(1, -1, 8)
    # Gradient codebooks: no EMA step after the initialisation, so only the initialisations differ.
    random_init = VQConfig(codebook_size=32, ema=False, kmeans_iters=0, restart_after_steps=0).build(8).train()
    kmeans_init = VQConfig(codebook_size=32, ema=False, kmeans_iters=10, restart_after_steps=0).build(8).train()
    random_init(z), kmeans_init(z)
    assert _distortion(kmeans_init, z) < 0.7 * _distortion(random_init, z)


def test_kmeans_over_several_batches_waits_for_them():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=8, kmeans_init_batches=3, restart_after_steps=0).build(2).train()
    vq(torch.randn(1, 64, 2))
    vq(torch.randn(1, 64, 2))
    assert not bool(vq.initialized)
    vq(torch.randn(1, 64, 2))
    assert bool(vq.initialized) and not vq._init_pool


def test_cosine_codes_are_unit_vectors():
    vq = VQConfig(codebook_size=8, cosine=True).build(4).train()
    out = vq(torch.randn(2, 16, 4) * 5)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    # Nearest by cosine: the code with the largest dot product with the normalised input.
    vq.eval()
    z = torch.randn(1, 10, 4)
    expected = (torch.nn.functional.normalize(z[0], dim=1) @ vq.code_vectors().t()).argmax(dim=1)
    assert torch.equal(vq(z).indices[0], expected)


def test_low_dimensional_codebook_searches_in_the_projected_space():
    vq = VQConfig(codebook_size=8, codebook_dim=2).build(6).eval()
    assert vq.codebook.shape == (8, 2)
    z = torch.randn(3, 5, 6)
    expected = nearest_codes(vq.project_in(z.reshape(-1, 6)), vq.codebook)
    assert torch.equal(vq(z).indices.reshape(-1), expected)


def test_gradient_codebook_moves_towards_its_data():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=2, ema=False, kmeans_iters=0, restart_after_steps=0).build(2).train()
    vq.codebook.data = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    vq.initialized.fill_(True)
    optimizer = torch.optim.SGD(vq.parameters(), lr=0.5)
    centres = torch.tensor([[3.0, 3.0], [-3.0, -3.0]])
    for _ in range(100):
        out = vq(_mixture(256, centres).view(1, -1, 2))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert torch.allclose(vq.codebook, centres, atol=0.1)
