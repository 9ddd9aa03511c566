"""The Poisson loader with the user's DataLoader settings: worker processes read and collate, sampling stays here.

For a seed, a loader with ``num_workers=2`` must hand out exactly the batches (indices, values, micro-batches,
empty batches) of the main-process loader, with the same listener calls in the same places, although its
workers read ahead: the read-ahead must not leak into the step the engine is told about, into checkpoints, or
into the next iteration after a ``break``.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info

from dpclip import PoissonDataLoader, PrivacyBudgetExceeded


class Items(Dataset):
    """Item i is (i, a row of values that depend on i, the id and pid of the process that read it)."""

    def __init__(self, n: int = 60) -> None:
        self.values = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3).sin()
        self.tag = "main"

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> tuple:
        info = get_worker_info()
        return i, self.values[i], -1 if info is None else info.id, os.getpid()


def tagging_init(worker_id: int) -> None:
    info = get_worker_info()
    info.dataset.tag = f"worker-{worker_id}"


class Tagged(Items):
    def __getitem__(self, i: int) -> tuple:
        return (*super().__getitem__(i), self.tag)


def dict_collate(samples: list) -> dict:
    """A user collate_fn (module level, so that spawn workers can unpickle it)."""
    return {
        "index": torch.tensor([s[0] for s in samples]),
        "x": torch.stack([s[1] for s in samples]),
        "worker": torch.tensor([s[2] for s in samples]),
        "pid": torch.tensor([s[3] for s in samples]),
        "tag": [s[4] for s in samples] if len(samples[0]) > 4 else [],
    }


class Recorder:
    """A listener that records the protocol; ``refuse_at`` makes begin_step raise at that (1-based) step."""

    def __init__(self, refuse_at: int | None = None) -> None:
        self.events: list[tuple] = []
        self.steps = 0
        self.refuse_at = refuse_at

    def begin_step(self) -> None:
        self.steps += 1
        if self.refuse_at is not None and self.steps >= self.refuse_at:
            raise PrivacyBudgetExceeded("refused by the test")
        self.events.append(("step",))

    def begin_micro_batch(self, index: int, last: bool, size: int | None = None, batch: object = None) -> None:
        self.events.append(("micro", index, last, size, id(batch)))

    def return_unread_batch(self) -> bool:  # every batch counts as used here: none goes back
        return False

    def check_skipped(self) -> None:
        pass

    def step_open(self) -> bool:
        return True


def contents(batch: object) -> tuple:
    """What a handed-out batch holds, minus the process that read it."""
    if isinstance(batch, dict):
        return tuple(batch["index"].tolist()), batch["x"].tolist()
    return tuple(batch[0].tolist()), batch[1].tolist()


def run(loader: PoissonDataLoader, epochs: int = 1, listener: Recorder | None = None) -> tuple[list, list]:
    """Every batch of ``epochs`` epochs (contents), and the listener's events with the yields interleaved."""
    listener = listener or Recorder()
    loader.listener = listener
    batches = []
    for _ in range(epochs):
        for batch in loader:
            listener.events.append(("yield", id(batch)))
            batches.append(contents(batch))
    events = [e[:-1] if e[0] == "micro" else e[:1] for e in listener.events]  # ids differ across loaders
    assert all(  # begin_micro_batch was told about the very object then yielded
        listener.events[i][-1] == listener.events[i + 1][-1]
        for i, e in enumerate(listener.events) if e[0] == "micro"
    )
    return batches, events


def loaders(dataset: Dataset, q: float = 0.04, physical: int | None = None, seed: int = 5, **options):
    """The main-process loader and the one built from a DataLoader with ``options``."""
    collate = options.pop("collate_fn", None)
    main = PoissonDataLoader(dataset, q, collate_fn=collate, max_physical_batch_size=physical, seed=seed)
    user = DataLoader(dataset, batch_size=8, collate_fn=collate, **options)
    workers = PoissonDataLoader.from_loader(user, q, max_physical_batch_size=physical, seed=seed)
    return main, workers


def worker_processes() -> int:
    return len(multiprocessing.active_children())


@pytest.mark.parametrize("physical", [None, 2])
def test_workers_hand_out_the_main_process_batches(physical: int | None) -> None:
    """Same seed → same batches, micro-batch split, empty batches and listener calls, over two epochs."""
    dataset = Items(60)  # q·N = 2.4: about one step in eleven is empty
    main, workers = loaders(dataset, physical=physical, num_workers=2)
    assert main.workers_loader is None and workers.workers_loader is not None
    expected, expected_events = run(main, epochs=2)
    got, events = run(workers, epochs=2)
    assert got == expected and events == expected_events
    assert any(len(indices) == 0 for indices, _ in expected)  # empty batches were part of it
    if physical is not None:
        assert any(e[0] == "micro" and e[1] > 0 for e in events)  # and split logical batches
    assert workers.batches_drawn == main.batches_drawn == 2 * len(main)
    assert workers.steps_done_in_epoch == 0 and workers.state_dict()["generator"].equal(main.state_dict()["generator"])


def test_tensor_dataset_fast_path_and_worker_path_agree() -> None:
    data = TensorDataset(torch.arange(50), torch.randn(50, 2, generator=torch.Generator().manual_seed(0)))
    main, workers = loaders(data, q=0.1, physical=3, num_workers=2)
    assert run(main) == run(workers)


def test_a_shard_set_after_construction_is_sampled_the_same() -> None:
    """dpclip.distributed sets ``loader.shard`` after make_private: the workers' sampler sees it."""
    main, workers = loaders(Items(60), q=0.2, physical=3, num_workers=2)
    main.shard = workers.shard = (1, 3)
    expected, got = run(main), run(workers)
    assert got == expected and all(i % 3 == 1 for indices, _ in got[0] for i in indices)


def test_worker_processes_really_read_the_items() -> None:
    dataset = Items(60)
    _, workers = loaders(dataset, q=0.2, num_workers=2, collate_fn=dict_collate)
    seen_workers, seen_pids = set(), set()
    for batch in workers:
        seen_workers |= set(batch["worker"].tolist())
        seen_pids |= set(batch["pid"].tolist())
    assert seen_workers == {0, 1}
    assert os.getpid() not in seen_pids and len(seen_pids) == 2


def test_the_users_collate_fn_and_worker_init_fn_are_honoured() -> None:
    dataset = Tagged(40)
    main, workers = loaders(dataset, q=0.2, num_workers=2, collate_fn=dict_collate, worker_init_fn=tagging_init)
    tags = set()
    for batch in workers:
        assert isinstance(batch, dict)  # the user's collate_fn, not default_collate
        tags |= set(batch["tag"])
        assert all(tag == f"worker-{w}" for tag, w in zip(batch["tag"], batch["worker"].tolist()))
    assert tags == {"worker-0", "worker-1"}
    assert dataset.tag == "main"  # worker_init_fn ran in the workers only


def test_other_settings_are_taken_over() -> None:
    user = DataLoader(Items(20), batch_size=4, num_workers=2, prefetch_factor=3, persistent_workers=True,
                      timeout=30, worker_init_fn=tagging_init, multiprocessing_context="fork")
    workers = PoissonDataLoader.from_loader(user, 0.2, seed=0).workers_loader
    assert workers is not None
    assert (workers.num_workers, workers.prefetch_factor, workers.persistent_workers, workers.timeout) == (2, 3, True, 30)
    assert workers.worker_init_fn is tagging_init and workers.multiprocessing_context is user.multiprocessing_context
    with pytest.raises(ValueError, match="prefetch_factor"):  # torch's own checks, at construction
        PoissonDataLoader(Items(20), 0.2, prefetch_factor=2)
    with pytest.raises(ValueError, match="persistent_workers"):
        PoissonDataLoader(Items(20), 0.2, persistent_workers=True)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_pinning_without_workers_goes_through_a_single_process_dataloader(monkeypatch: pytest.MonkeyPatch) -> None:
    """pin_memory with an accelerator (simulated: on CPU torch warns and does not pin) uses the DataLoader path
    with its in-process iterator; without an accelerator, pinning is moot and the main-process path is kept."""
    import dpclip.sampling as sampling

    assert loaders(Items(20), pin_memory=True)[1].workers_loader is None or sampling._accelerator_available()
    monkeypatch.setattr(sampling, "_accelerator_available", lambda: True)
    main, pinned = loaders(Items(60), physical=2, pin_memory=True)
    assert pinned.workers_loader is not None and pinned.workers_loader.num_workers == 0
    assert run(main, epochs=2) == run(pinned, epochs=2)


def test_in_order_false_is_not_taken_over() -> None:
    main, workers = loaders(Items(60), q=0.1, physical=2, num_workers=2, in_order=False)
    assert run(main) == run(workers)


def test_checkpoint_mid_epoch_restores_the_batches_despite_the_read_ahead() -> None:
    """k steps, state_dict (the workers have sampled further), continue → B; a fresh loader restored → B."""
    dataset = Items(60)
    main, workers = loaders(dataset, q=0.1, physical=2, num_workers=2, prefetch_factor=4)
    k, rest = 3, 6
    recorder = Recorder()
    workers.listener = recorder
    it = iter(workers)
    while not (workers.steps_done_in_epoch == k and recorder.events[-1][2]):  # up to the end of step k
        next(it)
    state = workers.state_dict()
    assert state["steps_done_in_epoch"] == k
    assert len(workers._run.states) > 0  # the workers really sampled ahead of the user
    after = []
    for batch in it:
        after.append(contents(batch))
        if workers.steps_done_in_epoch == k + rest:
            break
    for restored in (PoissonDataLoader.from_loader(DataLoader(dataset, num_workers=2), 0.1, max_physical_batch_size=2, seed=999),
                     PoissonDataLoader(dataset, 0.1, max_physical_batch_size=2, seed=999)):
        restored.load_state_dict(state)
        again = []
        for batch in restored:
            again.append(contents(batch))
            if restored.steps_done_in_epoch == k + rest:
                break
        assert again == after


def test_a_break_leaves_no_workers_and_the_next_iteration_continues_the_epoch() -> None:
    main, workers = loaders(Items(60), q=0.1, physical=2, num_workers=2)
    before = worker_processes()
    got, expected = [], []
    for loader, out in ((main, expected), (workers, got)):
        for batch in loader:
            out.append(contents(batch))
            if loader.steps_done_in_epoch == 4:
                break  # mid-step possibly: the rest of the step is dropped, as without workers
        assert loader.state_dict()["steps_done_in_epoch"] == 4
        out.extend(contents(b) for b in loader)  # the rest of the epoch
        out.extend(contents(b) for b in loader)  # and a whole new one
    assert got == expected
    assert worker_processes() == before


def test_load_state_dict_during_an_iteration_continues_from_the_loaded_position() -> None:
    main, workers = loaders(Items(60), q=0.1, num_workers=2)
    start = main.state_dict()
    out = {}
    for loader in (main, workers):
        batches = []
        for batch in loader:
            batches.append(contents(batch))
            if len(batches) == 3:
                loader.load_state_dict(start)  # back to the start of the epoch, in the middle of the loop
        out[loader] = batches
    assert out[main] == out[workers]
    assert out[main][:3] == out[main][3:6]


def test_persistent_workers_are_reused_and_survive_a_break() -> None:
    dataset = Items(60)
    before = worker_processes()
    main, workers = loaders(dataset, q=0.1, physical=2, num_workers=2, persistent_workers=True,
                            collate_fn=dict_collate)
    pids = []
    got, expected = [], []
    for loader, out in ((main, expected), (workers, got)):
        for epoch in range(3):
            for batch in loader:
                out.append(contents(batch))
                if loader is workers:
                    pids.append(set(batch["pid"].tolist()))
                if epoch == 1 and loader.steps_done_in_epoch == 3:
                    break
    assert got == expected
    assert len(set().union(*pids)) == 2  # the same two processes throughout
    assert worker_processes() == before + 2
    del workers, loader, batch  # no reference cycle keeps the persistent workers alive once the loader is dropped
    assert worker_processes() == before


@pytest.mark.parametrize("refuse_at", [1, 3])
def test_a_refused_step_hands_out_nothing_of_its_batch(refuse_at: int) -> None:
    """The budget guard raises in begin_step: nothing of that batch is yielded, and the loader resumes there."""
    dataset = Items(60)
    main, workers = loaders(dataset, q=0.1, physical=2, num_workers=2)
    before = worker_processes()
    results = {}
    for loader in (main, workers):
        recorder = Recorder(refuse_at=refuse_at)
        loader.listener = recorder
        yielded = []
        with pytest.raises(PrivacyBudgetExceeded):
            for batch in loader:
                yielded.append(contents(batch))
        results[loader] = yielded, recorder.events[-1:], loader.state_dict()
        assert loader.steps_done_in_epoch == refuse_at - 1
    (main_batches, main_last, main_state), (got, last, state) = results[main], results[workers]
    assert got == main_batches and [e[:-1] for e in last] == [e[:-1] for e in main_last]
    assert (len(got) == 0) == (refuse_at == 1)
    assert state["generator"].equal(main_state["generator"])  # the refused step is drawn again next time
    assert worker_processes() == before


def test_spawned_workers_unpickle_the_collate_wrapper() -> None:
    main, workers = loaders(Items(30), q=0.1, num_workers=1, multiprocessing_context="spawn")
    main.steps_per_epoch = workers.steps_per_epoch = 3
    assert run(main) == run(workers)


def test_make_private_keeps_the_workers() -> None:
    """Through the public API: the same seed trains the same model with and without workers."""
    from dpclip import PrivacyEngine

    data = TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 2)
    results = []
    for num_workers in (0, 2):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        engine = PrivacyEngine(seed=7)
        model, optimizer, loader = engine.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=8, num_workers=num_workers),
            noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=4,
        )
        if num_workers and loader.workers_loader is None:
            pytest.skip("make_private does not build its loader with PoissonDataLoader.from_loader yet")
        for x, y in loader:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
