"""Distributed helpers: a real 2-process gloo group gives the same metrics as one process over all
the data; atomic writes never leave a partial file; everything is a no-op without torchrun."""

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from freeseg import distributed
from freeseg.evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator

K = 5
CATEGORIES = [{"id": k, "isthing": k < 3, "seen": k != 1} for k in range(K)]


def semantic_data():
    g = torch.Generator().manual_seed(0)
    gts = [torch.randint(0, K, (8, 9), generator=g) for _ in range(5)]
    for gt in gts:
        gt[0, :3] = 255
    return [(torch.randint(0, K, (8, 9), generator=g), gt) for gt in gts]


def panoptic_data():
    """Block maps: gt ids 1..6 on a 4x4 grid (3x3 pixel cells); prediction = gt with some cells
    changed and segment ids shifted by 10."""
    g = torch.Generator().manual_seed(1)
    images = []
    for _ in range(5):
        cells = torch.randint(0, 7, (4, 4), generator=g)
        gt = cells.repeat_interleave(3, 0).repeat_interleave(3, 1)  # (12, 12)
        changed = torch.where(torch.rand(4, 4, generator=g) < 0.3, torch.randint(0, 7, (4, 4), generator=g), cells)
        pred = changed.repeat_interleave(3, 0).repeat_interleave(3, 1)
        pred = torch.where(pred > 0, pred + 10, pred)
        cat = torch.randint(0, K, (7,), generator=g).tolist()
        gt_segments = [{"id": i, "category_id": cat[i], "iscrowd": int(i == 6 and cat[i] < 3)}
                       for i in gt.unique().tolist() if i]
        pred_segments = [{"id": i, "category_id": cat[i - 10]} for i in pred.unique().tolist() if i]
        images.append((pred, pred_segments, gt, gt_segments))
    return images


def instance_data():
    g = torch.Generator().manual_seed(2)
    images = {}
    for image_id in range(1, 6):
        gt = torch.rand(3, 10, 10, generator=g) < 0.5
        noise = torch.rand(4, 10, 10, generator=g) < 0.1
        pred = torch.cat([gt, gt[:1]]) ^ noise
        images[image_id] = (gt, torch.tensor([0, 1, 2]), pred, torch.rand(4, generator=g), torch.tensor([0, 1, 2, 2]))
    return images


def fill_all(items, rank=0, world=1):
    """Three evaluators fed with every `world`-th image starting at `rank`."""
    sem, pan, ins = SemanticEvaluator(K, torch.tensor([c["seen"] for c in CATEGORIES])), \
        PanopticEvaluator(CATEGORIES), InstanceEvaluator(CATEGORIES)
    sem_data, pan_data, ins_data = items
    for pred, gt in sem_data[rank::world]:
        sem.update(pred, gt)
    for image in pan_data[rank::world]:
        pan.update(*image)
    ids = list(ins_data)[rank::world]
    if world == 2 and rank == 1:
        ids.append(ids[0] - 1)  # a sampler padding its last batch repeats rank 0's first image
    for image_id in ids:
        gt, gt_labels, pred, scores, labels = ins_data[image_id]
        ins.add_ground_truth(image_id, gt, gt_labels)
        ins.update(image_id, pred, scores, labels)
    return sem, pan, ins


def contrastive_loss(model, images, texts, world=1):
    gather = distributed.gather_rows if world > 1 else (lambda x: x)
    image_features, text_features = gather(model[0](images)), gather(model[1](texts))
    logits = image_features @ text_features.t()
    target = torch.arange(len(logits))
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                  + torch.nn.functional.cross_entropy(logits.t(), target)) * world


def contrastive_gradient_is_the_whole_batch_gradient(rank):
    """The tiny CLIP's recipe under torchrun: each rank encodes its half of the batch, the loss
    compares all images with all texts (gather_rows), and the summed gradients (loss x ranks,
    then engine.average_gradients) equal one process's gradient over the whole batch."""
    from freeseg import engine

    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(6, 4, dtype=torch.float64), torch.nn.Linear(5, 4, dtype=torch.float64)])
    images, texts = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    reference = torch.autograd.grad(contrastive_loss(model, images, texts), list(model.parameters()))
    mine = slice(4 * rank, 4 * rank + 4)
    contrastive_loss(model, images[mine], texts[mine], world=2).backward()
    engine.average_gradients(model)
    for p, g in zip(model.parameters(), reference):
        assert torch.allclose(p.grad, g, atol=1e-12), (p.grad, g)
    # Without the gathered rows each rank would only contrast its own half: another loss.
    local = torch.autograd.grad(
        0.5 * (torch.nn.functional.cross_entropy(model[0](images[mine]) @ model[1](texts[mine]).t(), torch.arange(4))
               + torch.nn.functional.cross_entropy(model[1](texts[mine]) @ model[0](images[mine]).t(), torch.arange(4))),
        list(model.parameters()))
    assert not torch.allclose(local[0], reference[0])


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    got_rank, world, local_rank, device = distributed.init_distributed(device="cpu")
    assert (got_rank, world, local_rank, device.type) == (rank, 2, rank, "cpu")
    assert distributed.get_rank() == rank and distributed.is_main() == (rank == 0)

    t = torch.tensor([rank + 1.0, 10.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [3.0, 20.0]
    assert distributed.all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]

    contrastive_gradient_is_the_whole_batch_gradient(rank)

    def alone():  # rank 0 sees a single process with both ranks' threads
        assert (distributed.get_rank(), distributed.get_world_size(), torch.get_num_threads()) == (0, 1, 2)
        assert distributed.init_distributed(device="cpu")[:2] == (0, 1)
        assert distributed.all_reduce_sum(torch.tensor([5.0])).item() == 5.0  # no other rank takes part
        return "done"

    assert distributed.run_alone(alone) == ("done" if rank == 0 else None)
    assert (distributed.get_rank(), distributed.get_world_size(), torch.get_num_threads()) == (rank, 2, 1)

    items = (semantic_data(), panoptic_data(), instance_data())
    sem, pan, ins = fill_all(items, rank, 2)
    ref_sem, ref_pan, ref_ins = fill_all(items)  # one process over all the data
    assert not torch.equal(sem.confusion, ref_sem.confusion)  # each rank saw only part of it
    sem.all_reduce()
    pan.all_reduce()
    ins.gather()
    assert torch.equal(sem.confusion, ref_sem.confusion)
    for name in ("tp", "fp", "fn", "iou_sum"):
        assert torch.allclose(getattr(pan, name), getattr(ref_pan, name)), name
    assert pan.summary() == pytest.approx(ref_pan.summary(), nan_ok=True)
    assert ins.summary() == pytest.approx(ref_ins.summary(), nan_ok=True)
    if distributed.is_main():
        distributed.atomic_write_json({"pq": pan.summary()["PQ"], "miou": sem.summary()["mIoU"],
                                       "ap": ins.summary()["AP"]}, os.path.join(out_dir, "rank0.json"))
    distributed.barrier()
    distributed.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_reduction_equals_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    # The data must give non-trivial metrics for the comparison to mean anything.
    assert 0 < result["pq"] < 100 and 0 < result["miou"] < 100 and 0 < result["ap"] < 100


def test_single_process_is_a_no_op(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_distributed(device="cpu") == (0, 1, 0, torch.device("cpu"))
    assert not distributed.is_distributed() and distributed.is_main()
    t = torch.tensor([2.0])
    assert distributed.all_reduce_sum(t).item() == 2.0
    assert distributed.all_gather_object("x") == ["x"]
    distributed.barrier()
    distributed.print0("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    distributed.atomic_torch_save({"step": 1}, path)
    assert torch.load(path)["step"] == 1

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(distributed.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        distributed.atomic_torch_save({"step": 2}, path)
    with pytest.raises(OSError, match="disk full"):
        distributed.atomic_torch_save({"step": 2}, tmp_path / "new.pth")
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1  # the previous checkpoint is intact,
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no new.pth and no temporary file left behind


def test_atomic_write_json(tmp_path):
    path = tmp_path / "sub" / "results.json"
    distributed.atomic_write_json({"a": 1.5}, path)
    assert json.loads(path.read_text()) == {"a": 1.5}
    with pytest.raises(ValueError):  # NaN is not JSON: the old file survives
        distributed.atomic_write_json({"a": math.nan}, path)
    assert json.loads(path.read_text()) == {"a": 1.5} and os.listdir(path.parent) == ["results.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_users_umask(tmp_path, umask):
    """mkstemp creates its file 0600; the written file must get what a plain open would give."""
    from freeseg.data.io import save_png_atomic

    old = os.umask(umask)
    try:
        distributed.atomic_torch_save({"step": 1}, tmp_path / "c.pt")
        distributed.atomic_write_json({"a": 1}, tmp_path / "r.json")
        save_png_atomic(np.zeros((2, 2), dtype=np.uint8), str(tmp_path / "m.png"))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    for name in ("c.pt", "r.json", "m.png", "plain"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o666 & ~umask, name


def test_a_signal_during_an_atomic_write_leaves_nothing_behind(tmp_path):
    """SIGTERM (turned into an exception by freeseg.errors.run_cli) or Ctrl-C while a checkpoint
    is written: the previous file stays, the temporary one goes."""
    import signal

    from freeseg.errors import run_cli

    path = tmp_path / "ckpt.pt"
    distributed.atomic_torch_save({"step": 1}, path)

    def stopped(argv):
        with distributed.atomic_write(str(path), "wb") as f:  # as atomic_torch_save writes
            f.write(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            f.write(b"never")
    assert run_cli(stopped, [], prog="test") == 143
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path)["step"] == 1
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the command's handler is gone with it
