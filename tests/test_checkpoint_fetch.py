"""A resuming rank fetches only what it reads, an export only the folder it copies, on a local folder, a file://
URI and S3 (moto): a real 2-rank sharded checkpoint (FSDP2 + AdamW through `save_checkpoint`, gloo on CPU), the
bytes each rank reads counted through a filesystem that counts them, and a 2-rank load from what each fetched.
(A LLaVA FSDP run resumed through the same fetch: `test_distributed.py`.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import distributed_runs as runs
import pyarrow
import pyarrow.fs
import pytest
import torch

from raysal import storage
from raysal.loop.checkpoint import HISTORY, MODEL, SHARDED, STATE
from raysal.orchestration.train.checkpoint_fetch import REPLICATED, fetch_folder, fetch_for_resume, folders

WORLD = 2
OWN = {0: f"{SHARDED}/__0_0.distcp", 1: f"{SHARDED}/__1_0.distcp"}  # FileSystemWriter's file of each rank


class Tiny(torch.nn.Module):
    """Three linear layers, the last with one output row (rank 1's shard of it is empty: uneven FSDP chunks), and
    the ``save_pretrained`` `save_checkpoint` calls for a fully finetuned model's ``model/``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8), torch.nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 256) → (B, 1)
        return self.layers(x)

    def save_pretrained(self, dest: Path, state_dict: dict | None = None) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict if state_dict is not None else self.state_dict(), dest / "model.pt")
        (dest / "config.json").write_text("{}")


def _sharded_tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tiny()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Weights and optimizer state gathered (every rank calls it; rank 0 gets the whole)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return {"model": model_sd, "optim": optim_sd}


def save_and_resume(rank: int, world: int, out: str) -> None:
    """Two AdamW steps of a sharded model, a checkpoint from both ranks into one folder (what Ray merges); then
    each rank fetches its part of it (as `worker.py` does) and loads a fresh model from that alone."""
    import torch.distributed as dist

    from raysal.loop.checkpoint import Progress, load_checkpoint, save_checkpoint

    out = Path(out)
    model, optimizer, scheduler = _sharded_tiny()
    for i in range(2):
        model(torch.randn(4, 256, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    save_checkpoint(out / "ckpt", model, optimizer, scheduler, Progress(step=2), [{"train/step": 2.0}])
    saved = _full_state(model, optimizer)
    dist.barrier()  # rank 0 writes state.pt after the shards
    got = fetch_for_resume(str(out / "ckpt"), out / f"rank{rank}", rank=rank, world_size=world)
    (out / f"fetched{rank}.json").write_text(json.dumps(got.files))
    model, optimizer, scheduler = _sharded_tiny()
    progress = load_checkpoint(got.local, model, optimizer, scheduler)
    loaded = _full_state(model, optimizer)
    if rank == 0:
        torch.save(saved, out / "expected.pt")
        torch.save({**loaded, "step": progress.step, "lr": scheduler.get_last_lr()}, out / "loaded.pt")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A real 2-rank checkpoint folder ``ckpt``: state.pt, history.jsonl, model/ (gathered), sharded/ (DCP, one
    file per rank); beside it the state it holds (``expected.pt``) and what the ranks loaded from their fetches."""
    out = tmp_path_factory.mktemp("written")
    runs.spawn(save_and_resume, WORLD, str(out))
    return out


def _sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _every_rank_reads_bytes(ckpt: Path, rel: str) -> int:
    """Bytes of the items in one shard file that every rank loads (bytes items, tensors saved whole)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = pickle.loads((ckpt / SHARDED / ".metadata").read_bytes())
    n = 0
    for index, info in md.storage_data.items():
        item = md.state_dict_metadata[index.fqn]
        chunks = item.chunks if isinstance(item, TensorStorageMetadata) else []
        whole = not chunks or (len(chunks) == 1 and chunks[0].sizes == item.size)
        n += info.length if f"{SHARDED}/{info.relative_path}" == rel and whole else 0
    return n


class Counting(pyarrow.fs.FileSystemHandler):
    """A filesystem over another that records the bytes read from each file (``read``: path → bytes)."""

    def __init__(self, inner: pyarrow.fs.FileSystem) -> None:
        self.inner, self.read = inner, {}

    def _count(self, path: str, f: pyarrow.NativeFile) -> pyarrow.PythonFile:
        handler = self

        class Reader:
            closed = False

            def read(self, n: int = -1) -> bytes:
                data = f.read() if n is None or n < 0 else f.read(n)
                handler.read[path] = handler.read.get(path, 0) + len(data)
                return data

            def seek(self, offset: int, whence: int = 0) -> int:
                return f.seek(offset, whence)

            def tell(self) -> int:
                return f.tell()

            def size(self) -> int:
                return f.size()

            def close(self) -> None:
                self.closed = True
                f.close()

        return pyarrow.PythonFile(Reader(), mode="r")

    def open_input_stream(self, path):
        return self._count(path, self.inner.open_input_stream(path))

    def open_input_file(self, path):
        return self._count(path, self.inner.open_input_file(path))

    def get_type_name(self):
        return f"counting-{self.inner.type_name}"

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def equals(self, other):
        return self is other

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.inner.delete_file(path)

    def move(self, src, dest):
        self.inner.move(src, dest)

    def copy_file(self, src, dest):
        self.inner.copy_file(src, dest)

    def open_output_stream(self, path, metadata):
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


def _counted(location: str):
    """A ``ray.train.Checkpoint`` of a storage location read through `Counting` → (checkpoint, its counter)."""
    import ray.train

    fs, inner = storage.filesystem(location)
    counter = Counting(fs)
    return ray.train.Checkpoint(inner, filesystem=pyarrow.fs.PyFileSystem(counter)), counter, inner


def test_each_rank_fetches_its_own_shard_and_not_the_others(written, storage_root, tmp_path, caplog):
    ckpt, sizes = written / "ckpt", _sizes(written / "ckpt")
    assert {OWN[0], OWN[1], STATE, HISTORY, f"{SHARDED}/.metadata", f"{MODEL}/model.pt"} <= set(sizes)
    location = storage.join(storage_root, "run", "checkpoint_0000002")
    storage.upload(ckpt, location)
    total = sum(sizes.values())
    for rank in range(WORLD):
        other = OWN[1 - rank]
        checkpoint, counter, inner = _counted(location)
        with caplog.at_level("INFO", logger="raysal.orchestration.train.checkpoint_fetch"):
            got = fetch_for_resume(checkpoint, tmp_path / f"rank{rank}", rank=rank, world_size=WORLD)
        assert {k.removeprefix(inner + "/"): v for k, v in counter.read.items()} == got.files  # what it says it read
        assert f"rank {rank}: fetched {len(got.files)} files" in caplog.text
        print(f"rank {rank}: {got.bytes} of {total} bytes: {got.files}")
        assert got.files[OWN[rank]] == sizes[OWN[rank]] and got.files[STATE] == sizes[STATE]
        # of the other rank's file only what every rank loads (DCP writes param_groups, AdamW's steps once)
        assert got.files.get(other, 0) == _every_rank_reads_bytes(ckpt, other) < sizes[other] / 4
        assert got.bytes < total - sizes[other] + sizes[other] / 4 and got.bytes < total / 2
        assert not any(k.startswith(MODEL) for k in got.files)  # model/: exports, never a resume
        assert (HISTORY in got.files) == (rank == 0)  # rank 0 alone re-logs and saves the rows
        local = sorted(str(p.relative_to(got.local)) for p in got.local.rglob("*") if p.is_file())
        want = [f"{SHARDED}/.metadata", OWN[rank], STATE] + ([HISTORY] if rank == 0 else [])
        assert local == sorted(want + ([f"{SHARDED}/{REPLICATED}"] if other in got.files else []))
    # the same from the location itself (no ray.train.Checkpoint)
    assert fetch_for_resume(location, tmp_path / "again", rank=1, world_size=WORLD).files == got.files


def test_two_ranks_resume_exactly_from_what_each_fetched(written):
    """Rank 0 reads the other rank's param_groups and steps from the ranges it fetched; the rest is its own."""
    for rank in range(WORLD):
        assert set(json.loads((written / f"fetched{rank}.json").read_text())) >= {STATE, OWN[rank]}
        local = written / f"rank{rank}"
        assert OWN[1 - rank] not in {str(p.relative_to(local)) for p in local.rglob("*.distcp")}
    want, got = torch.load(written / "expected.pt", weights_only=False), torch.load(written / "loaded.pt")
    assert got["step"] == 2 and got["lr"] == pytest.approx([1e-2 / 3])
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    for k, state in want["optim"]["state"].items():
        for name, v in state.items():
            assert torch.equal(got["optim"]["state"][k][name], v), (k, name)
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]


@pytest.mark.parametrize("world_size", [1, 3])
def test_another_world_size_fetches_every_shard(written, tmp_path, world_size, caplog):
    sizes = _sizes(written / "ckpt")
    with caplog.at_level("INFO", logger="raysal.orchestration.train.checkpoint_fetch"):
        got = fetch_for_resume(str(written / "ckpt"), tmp_path, rank=world_size - 1, world_size=world_size)
    assert got.files[OWN[0]] == sizes[OWN[0]] and got.files[OWN[1]] == sizes[OWN[1]]
    assert f"written by 2 ranks, this run has {world_size}" in caplog.text
    assert (tmp_path / SHARDED / ".metadata").read_bytes() == (written / "ckpt" / SHARDED / ".metadata").read_bytes()
    assert not any(k.startswith(MODEL) for k in got.files)


def test_a_checkpoint_that_does_not_record_its_world_size_fetches_every_shard(written, tmp_path, caplog):
    old = tmp_path / "old"
    storage.upload(written / "ckpt", str(old))
    state = torch.load(old / STATE, weights_only=False)
    del state["world_size"]  # saved before raysal recorded it
    torch.save(state, old / STATE)
    with caplog.at_level("INFO", logger="raysal.orchestration.train.checkpoint_fetch"):
        got = fetch_for_resume(str(old), tmp_path / "fetched", rank=0, world_size=WORLD)
    assert OWN[0] in got.files and got.files[OWN[1]] == (old / OWN[1]).stat().st_size
    assert "does not record how many ranks wrote it" in caplog.text


def test_an_unsharded_checkpoint_fetches_its_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    torch.save({"sharded": False}, ckpt / STATE)
    (ckpt / HISTORY).write_text(json.dumps({"train/step": 1.0}) + "\n")
    assert set(fetch_for_resume(str(ckpt), tmp_path / "r0", rank=0, world_size=2).files) == {STATE, HISTORY}
    assert set(fetch_for_resume(str(ckpt), tmp_path / "r1", rank=1, world_size=2).files) == {STATE}


def test_bad_checkpoints_are_named_with_the_reason(written, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no checkpoint folder there"):
        fetch_for_resume(str(tmp_path / "nowhere"), tmp_path / "x", rank=0, world_size=WORLD)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: not a raysal checkpoint \(no state.pt\)"):
        fetch_for_resume(str(tmp_path / "empty"), tmp_path / "x", rank=0, world_size=WORLD)
    half = tmp_path / "half"
    storage.upload(written / "ckpt", str(half))
    (half / OWN[1]).unlink()  # rank 1's upload never finished
    with pytest.raises(FileNotFoundError, match=r"half/sharded: \['__1_0.distcp'\] named in .metadata are missing"):
        fetch_for_resume(str(half), tmp_path / "x", rank=0, world_size=WORLD)
    with pytest.raises(FileNotFoundError, match=r"half: no adapter/ in the checkpoint"):
        fetch_folder(str(half), "adapter", tmp_path / "y")


def test_export_best_reads_only_the_adapter(written, storage_root, tmp_path):
    """A LoRA checkpoint with FSDP's sharded/ beside its adapter/: the export lists it, reads adapter/ alone."""
    from raysal.orchestration.train.trainer import export_best

    local = tmp_path / "ckpt"
    storage.upload(written / "ckpt" / SHARDED, str(local / SHARDED))
    storage.upload(written / "ckpt" / STATE, str(local / STATE))
    (local / "adapter" / "sub").mkdir(parents=True)
    (local / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (local / "adapter" / "sub" / "adapter_model.safetensors").write_bytes(b"\1" * 5000)
    location = storage.join(storage_root, "run", "checkpoint_0000004")
    storage.upload(local, location)
    checkpoint, counter, inner = _counted(location)
    assert folders(checkpoint) == ["adapter", SHARDED]
    key, dest = export_best(checkpoint, storage.join(storage_root, "run"), {"val/amr": 0.5})
    assert key == "best_adapter" and dest == storage.join(storage_root, "run", "best_adapter")
    read = {k.removeprefix(inner + "/"): v for k, v in counter.read.items()}
    assert read == {"adapter/adapter_config.json": 8, "adapter/sub/adapter_model.safetensors": 5000}
    assert storage.list_names(dest) == ["adapter_config.json", "best.json", "sub"]
    assert storage.read_bytes(storage.join(dest, "sub", "adapter_model.safetensors")) == b"\1" * 5000
    assert storage.read_json(storage.join(dest, "best.json"))["metrics"] == {"val/amr": 0.5}
