"""`vaejob.loader.plan` as the pure functions it is: no tars, just shard counts in, streams out."""

from __future__ import annotations

import itertools

import pytest

from vaejob.loader.plan import Stream, continue_at, num_batches, plan_epoch
from vaejob.shards.format import SplitShards

SPLIT = SplitShards(urls=tuple(f"s{i}.tar" for i in range(5)), counts=(7, 3, 10, 1, 9))  # 30 samples
LAYOUTS = list(itertools.product((1, 2, 3), (1, 2, 3), (1, 2, 4)))  # world, streams, batch size


def samples_of(stream: Stream) -> list[tuple[str, int] | None]:
    """The stream's samples in reading order (no shuffle buffer), val padding as None."""
    real = [(url, i) for url, a, b, *_ in stream.segments for i in range(a, b)]
    return real + [None] * stream.pad


def batches_from(plan: list[Stream], batch_size: int) -> list[list]:
    """The batches the consumer receives, in order: round-robin over the workers, each stream skipping the
    batches it fast-forwards (what ``pipeline.run_stream`` and the DataLoader do, with shuffle_buffer=1)."""
    per_worker = []
    for s in plan:
        items = samples_of(s)[s.skip * batch_size :]
        per_worker.append([items[k * batch_size : (k + 1) * batch_size] for k in range(s.batches)])
    out = []
    for t in itertools.count():
        w, k = t % len(plan), t // len(plan)
        if k >= len(per_worker[w]):
            break
        out.append(per_worker[w][k])
    return out


def plan(
    train: bool, rank: int, world: int, streams: int, batch_size: int, start: int = 0, **kw
) -> list[Stream]:
    args = dict(seed=1, epoch=2) | kw
    return plan_epoch(
        SPLIT,
        train=train,
        rank=rank,
        world=world,
        batch_size=batch_size,
        streams=streams,
        start=start,
        **args,
    )


@pytest.mark.parametrize("world, streams, batch_size", LAYOUTS)
def test_train_ranks_get_equal_disjoint_quotas(world: int, streams: int, batch_size: int) -> None:
    nb = num_batches(SPLIT.count, True, world, batch_size)
    assert nb == SPLIT.count // (world * batch_size)
    seen: list = []
    for rank in range(world):
        streams_of_rank = plan(True, rank, world, streams, batch_size)
        assert len(streams_of_rank) == streams
        assert sum(s.batches for s in streams_of_rank) == nb  # every rank the same batch count (DDP)
        assert all(s.pad == 0 and s.skip == 0 and s.seed is not None for s in streams_of_rank)
        batches = batches_from(streams_of_rank, batch_size)
        assert len(batches) == nb and all(len(b) == batch_size for b in batches)
        seen += [x for b in batches for x in b]
    assert None not in seen and len(seen) == len(set(seen)) == world * nb * batch_size  # disjoint


@pytest.mark.parametrize("world, streams, batch_size", LAYOUTS)
def test_val_counts_every_sample_once(world: int, streams: int, batch_size: int) -> None:
    nb = num_batches(SPLIT.count, False, world, batch_size)
    seen: list = []
    for rank in range(world):
        streams_of_rank = plan(False, rank, world, streams, batch_size)
        batches = batches_from(streams_of_rank, batch_size)
        assert len(batches) == nb and all(len(b) == batch_size for b in batches)  # padded to whole batches
        assert all(s.seed is None for s in streams_of_rank)
        seen += [x for b in batches for x in b if x is not None]
    everything = [(url, i) for url, c in zip(SPLIT.urls, SPLIT.counts, strict=True) for i in range(c)]
    assert sorted(seen) == sorted(everything)
    if world == streams == 1:
        assert seen == everything  # unshuffled, one stream: manifest order


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world, streams, batch_size", LAYOUTS)
def test_a_resumed_epoch_continues_exactly(train: bool, world: int, streams: int, batch_size: int) -> None:
    for rank in range(world):
        full = batches_from(plan(train, rank, world, streams, batch_size), batch_size)
        for start in range(len(full) + 1):
            resumed = batches_from(plan(train, rank, world, streams, batch_size, start=start), batch_size)
            assert resumed == full[start:], (rank, start)


def test_shard_order_is_a_function_of_seed_and_epoch() -> None:
    def order(**kw: int) -> list[str]:
        names = [url for url, *_ in plan(True, 0, 1, 1, 1, **kw)[0].segments]
        return names

    assert sorted(order(seed=1, epoch=0)) == sorted(SPLIT.urls)
    assert order(seed=1, epoch=3) == order(seed=1, epoch=3)
    assert len({tuple(order(seed=1, epoch=e)) for e in range(6)}) > 1
    assert [order(seed=1, epoch=e) for e in range(4)] != [order(seed=2, epoch=e) for e in range(4)]
    val = [url for url, *_ in plan(False, 0, 1, 1, 1)[0].segments]
    assert val == list(SPLIT.urls)  # val: manifest order, whatever the seed


def test_continue_at_keeps_the_fraction_consumed() -> None:
    assert continue_at(3, 2 * 8, 1 * 8) == 6  # half the ranks: twice the batches consumed
    assert continue_at(3, 16, 48) == 1  # rounded down: samples may repeat, never be skipped at the start
    assert continue_at(0, 16, 24) == 0
