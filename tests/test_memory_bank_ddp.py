"""HypergraphMemoryBank under data parallelism: 2 gloo ranks (plain torch and Lightning ddp_spawn) on CPU.

Every rank fills the bank with its own, uneven shard (including a repeated padded sample); after ``finalize`` every
rank must hold exactly the bank a single process builds from the whole data set, with and without a coreset.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from torch import distributed

from anomalib_hypergraph.hypergraph import HypergraphMemoryBank, gather_rows

pytestmark = pytest.mark.skipif(
    not (distributed.is_available() and distributed.is_gloo_available()), reason="torch.distributed gloo backend"
)

WORLD_SIZE = 2
ROWS_PER_SAMPLE = 3
CHANNELS = 8
CORESET_RATIO = 0.5


def sample_features(index: int) -> torch.Tensor:
    """Patch features of sample ``index``, derived from the index alone so every process agrees."""
    return torch.randn(ROWS_PER_SAMPLE, CHANNELS, generator=torch.Generator().manual_seed(1000 + index))


def sample_keys(index: int) -> torch.Tensor:
    return index * ROWS_PER_SAMPLE + torch.arange(ROWS_PER_SAMPLE)


def single_process_banks(num_samples: int) -> dict[str, torch.Tensor]:
    bank = HypergraphMemoryBank(domains=("plain", "coreset"))
    for index in range(num_samples):
        for domain in bank.domains:
            bank.add(domain, sample_features(index), sample_keys(index))
    return {
        "plain": bank.finalize("plain", gather=False),
        "coreset": bank.finalize("coreset", coreset_ratio=CORESET_RATIO, gather=False, seed=3),
    }


# ----------------------------------------------------------------------------------- plain torch.multiprocessing
SHARDS = {0: [4, 0, 2, 6, 8, 0], 1: [1, 3, 5, 7]}  # uneven; sample 0 repeated as padding, out of order
NUM_SAMPLES = 9


def torch_worker(rank: int, init_file: str, output_dir: str) -> None:
    distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        gathered = gather_rows(torch.full((rank + 1, 2), float(rank)))  # 1 row from rank 0, 2 rows from rank 1
        bank = HypergraphMemoryBank(domains=("plain", "coreset"))
        for index in SHARDS[rank]:
            for domain in bank.domains:
                bank.add(domain, sample_features(index), sample_keys(index))
        result = {
            "gathered": gathered,
            "plain": bank.finalize("plain"),
            "coreset": bank.finalize("coreset", coreset_ratio=CORESET_RATIO, seed=3),
        }
        torch.save(result, Path(output_dir) / f"rank{rank}.pt")
    finally:
        distributed.destroy_process_group()


def test_finalize_across_two_gloo_ranks_equals_single_process_bank(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(
        torch_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True
    )
    expected = single_process_banks(NUM_SAMPLES)
    assert expected["plain"].shape == (NUM_SAMPLES * ROWS_PER_SAMPLE, CHANNELS)
    assert expected["coreset"].shape == (int(NUM_SAMPLES * ROWS_PER_SAMPLE * CORESET_RATIO), CHANNELS)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(result["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert torch.equal(result["plain"], expected["plain"])
        assert torch.equal(result["coreset"], expected["coreset"])


# ------------------------------------------------------------------------------------------ Lightning ddp_spawn
LIGHTNING_SAMPLES = 7  # odd: the DistributedSampler pads rank 1's shard with a repeated sample


class IndexDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return LIGHTNING_SAMPLES

    def __getitem__(self, index: int) -> int:
        return index


class BankFillingModule(lightning.LightningModule):
    """Adds each batch's features (keys = sample index based) to a bank and finalises it at the end of the epoch."""

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.scale = torch.nn.Parameter(torch.ones(()))  # DDP needs a trainable parameter
        self.bank = HypergraphMemoryBank(domains=("plain", "coreset"))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        del batch_idx
        features = torch.cat([sample_features(int(index)) for index in batch])
        keys = torch.cat([sample_keys(int(index)) for index in batch])
        for domain in self.bank.domains:
            self.bank.add(domain, features, keys)
        return (self.scale * features.mean()) ** 2

    def on_train_epoch_end(self) -> None:
        result = {
            "plain": self.bank.finalize("plain"),
            "coreset": self.bank.finalize("coreset", coreset_ratio=CORESET_RATIO, seed=3),
        }
        torch.save(result, Path(self.output_dir) / f"lightning_rank{self.global_rank}.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(IndexDataset(), batch_size=2, shuffle=False)


def test_lightning_ddp_spawn_bank_equals_single_process_bank(tmp_path: Path) -> None:
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BankFillingModule(str(tmp_path)))
    expected = single_process_banks(LIGHTNING_SAMPLES)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"lightning_rank{rank}.pt")
        assert torch.equal(result["plain"], expected["plain"])
        assert torch.equal(result["coreset"], expected["coreset"])
