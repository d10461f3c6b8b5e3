"""Bank search backends (hypergraph/search.py) and the memory bank's cached squared norms.

The faiss tests skip cleanly when faiss is not installed; the norm-buffer and exact-backend tests always run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from anomalib_hypergraph.hypergraph import BankIndex, HypergraphMemoryBank, chunked_knn, squared_row_norms
from anomalib_hypergraph.hypergraph.search import SEARCH_BACKENDS
from tests.test_hypertrans_model import fill_banks, make_model


def _clustered(rows: int, channels: int, clusters: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, channels, generator=generator)
    labels = torch.randint(clusters, (rows,), generator=generator)
    return centres[labels] + spread * torch.randn(rows, channels, generator=generator)


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 64, 64, generator=generator)


# ------------------------------------------------------------------------------------------ norms, always run
def test_squared_row_norms_equal_the_full_reduction_bit_for_bit() -> None:
    rows = torch.randn(40_000, 48)
    assert torch.equal(squared_row_norms(rows, block=1000), rows.pow(2).sum(dim=1))
    assert torch.equal(squared_row_norms(rows), rows.pow(2).sum(dim=1))


def test_chunked_knn_with_given_norms_equals_without() -> None:
    query, reference = torch.randn(100, 16), torch.randn(700, 16)
    expected = chunked_knn(query, reference, 5, chunk_size=64)
    actual = chunked_knn(query, reference, 5, chunk_size=64, reference_squared_norm=squared_row_norms(reference))
    assert torch.equal(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1])
    with pytest.raises(ValueError, match="reference_squared_norm"):
        chunked_knn(query, reference, 5, reference_squared_norm=torch.ones(3))


def test_norm_buffer_round_trip_and_old_state_dicts_without_norms() -> None:
    bank = HypergraphMemoryBank(domains=("source", "target"))
    bank.set("source", torch.randn(50, 8))
    bank.set("target", torch.randn(20, 8))
    state = bank.state_dict()
    assert "source_bank_squared_norm" in state
    assert torch.equal(state["source_bank_squared_norm"], bank.get("source").pow(2).sum(dim=1))

    restored = HypergraphMemoryBank(domains=("source", "target"))
    restored.load_state_dict(state)
    assert torch.equal(restored.squared_norm("source"), bank.squared_norm("source"))

    old = {key: value for key, value in state.items() if not key.endswith("_squared_norm")}  # before the cache
    from_old = HypergraphMemoryBank(domains=("source", "target"))
    from_old.load_state_dict(old)  # strict: the norms are recomputed, not reported missing
    assert torch.equal(from_old.squared_norm("target"), bank.squared_norm("target"))
    query = torch.randn(5, 8)
    assert torch.equal(from_old.nearest(query, "source", k=3)[1], bank.nearest(query, "source", k=3)[1])


def test_hypertrans_checkpoint_without_norms_still_loads(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = make_model()
    fill_banks(model, images[:4], images[4:])
    model.fit_banks(iterations=2, lr=1e-3)
    model.eval()
    with torch.no_grad():
        expected = model(images[:2])
    old = {key: value for key, value in model.state_dict().items() if not key.endswith("_squared_norm")}
    torch.manual_seed(1)
    restored = make_model().eval()
    restored.load_state_dict(old)
    with torch.no_grad():
        actual = restored(images[:2])
    assert torch.equal(actual.pred_score, expected.pred_score)


def test_exact_backend_is_chunked_knn() -> None:
    bank, query = torch.randn(300, 12), torch.randn(40, 12)
    distances, indices = BankIndex("exact", chunk_size=64).search(query, bank, 4)
    expected = chunked_knn(query, bank, 4, chunk_size=64)
    assert torch.equal(distances, expected[0])
    assert torch.equal(indices, expected[1])


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="search_backend must be one of"):
        BankIndex("annoy")
    with pytest.raises(ValueError, match="search_backend must be one of"):
        make_model(search_backend="annoy")


# ------------------------------------------------------------------------------------------ faiss
def test_faiss_flat_equals_exact_search() -> None:
    pytest.importorskip("faiss")
    bank, query = _clustered(5000, 32, 50, seed=0), _clustered(300, 32, 50, seed=1)
    expected_distances, expected_indices = chunked_knn(query, bank, 5)
    distances, indices = BankIndex("faiss_flat").search(query, bank, 5)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances)


@pytest.mark.parametrize(("backend", "bound"), [("faiss_ivf", 0.9), ("faiss_hnsw", 0.9)])
def test_approximate_recall_at_1_on_clustered_data(backend: str, bound: float) -> None:
    pytest.importorskip("faiss")
    bank, query = _clustered(20_000, 32, 100, seed=2), _clustered(500, 32, 100, seed=3)
    _, expected = chunked_knn(query, bank, 1)
    distances, indices = BankIndex(backend, seed=0).search(query, bank, 3)
    recall = float((indices[:, 0] == expected[:, 0]).float().mean())
    assert recall >= bound, f"{backend} recall@1 {recall:.3f} below {bound}"
    assert torch.all(distances[:, 1:] >= distances[:, :-1])  # ascending, exact distances
    torch.testing.assert_close(distances[:, 0], torch.linalg.vector_norm(query - bank[indices[:, 0]], dim=1))


def test_ivf_is_seeded() -> None:
    pytest.importorskip("faiss")
    bank, query = _clustered(8000, 16, 40, seed=4), _clustered(200, 16, 40, seed=5)
    first = BankIndex("faiss_ivf", nprobe=2, seed=3).search(query, bank, 2)[1]
    assert torch.equal(BankIndex("faiss_ivf", nprobe=2, seed=3).search(query, bank, 2)[1], first)


@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_ivf", "faiss_hnsw"])
def test_index_is_rebuilt_when_the_bank_changes(backend: str) -> None:
    pytest.importorskip("faiss")
    index = BankIndex(backend, seed=0)
    bank = _clustered(2000, 16, 20, seed=6)
    index.search(bank[:10], bank, 1)
    index.search(bank[:10], bank, 1)
    assert index.builds == 1  # same bank: no rebuild
    bank.copy_(_clustered(2000, 16, 20, seed=7))  # in place, as load_state_dict does
    _, indices = index.search(bank[:10], bank, 1)
    assert index.builds == 2
    assert indices[:, 0].tolist() == list(range(10))
    other = _clustered(1500, 16, 20, seed=8)
    _, indices = index.search(other[:10], other, 1)
    assert index.builds == 3
    assert indices[:, 0].tolist() == list(range(10))
    assert copy.deepcopy(index).builds == 3  # copies drop the built index and rebuild on use


def test_hypertrans_index_follows_a_state_dict_load(images: torch.Tensor) -> None:
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    trained = make_model(search_backend="faiss_flat")
    fill_banks(trained, images[:4], images[4:])
    trained.fit_banks(iterations=2, lr=1e-3)
    trained.eval()
    torch.manual_seed(0)
    other = make_model(search_backend="faiss_flat")
    fill_banks(other, images[2:], images[:2])  # different banks of the same size
    other.fit_banks(iterations=2, lr=1e-3)
    other.eval()
    with torch.no_grad():
        expected = trained(images[:2])
        other(images[:2])  # builds the indexes of the other banks
        other.load_state_dict(trained.state_dict())
        actual = other(images[:2])
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-6)


def test_hypertrans_faiss_flat_scores_equal_exact(images: torch.Tensor) -> None:
    pytest.importorskip("faiss")
    scores = {}
    for backend in ("exact", "faiss_flat"):
        torch.manual_seed(0)  # the tiny random backbone is initialised from the global generator
        model = make_model(search_backend=backend)
        fill_banks(model, images[:4], images[4:])
        model.fit_banks(iterations=3, lr=1e-3)
        model.eval()
        with torch.no_grad():
            scores[backend] = model(images[:3])
    torch.testing.assert_close(scores["faiss_flat"].pred_score, scores["exact"].pred_score, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["faiss_flat"].anomaly_map, scores["exact"].anomaly_map, rtol=0, atol=1e-5)


def test_backends_listed() -> None:
    assert SEARCH_BACKENDS == ("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw")


def test_without_faiss_exact_works_and_faiss_backends_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "anomalib-hypergraph\[faiss\]"'):
        BankIndex("faiss_flat")
    with pytest.raises(ImportError, match="faiss"):
        make_model(search_backend="faiss_hnsw")
    bank = torch.randn(50, 4)
    assert BankIndex("exact").search(bank[:2], bank, 1)[1][:, 0].tolist() == [0, 1]
