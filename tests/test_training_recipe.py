"""The recipe reaches the training step (chapters 6 and 7): LR per iteration, label smoothing,
soft Mixup/CutMix targets in the loss, and a test loader without augmentation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitsd_nbdev.data as data
from vitsd_nbdev.data import AugmentConfig, get_dataset
from vitsd_nbdev.fastdata import get_device_loaders, to_tensors   # the batch loaders (appendix 13)
from vitsd_nbdev.training import TrainConfig, load_checkpoint, lr_at, train
from vitsd_nbdev.vit import create_model

TINY = dict(dataset="digits", image_size=16, preset="tiny", batch_size=64)


def test_train_sets_the_scheduled_lr_before_every_iteration(tmp_path, monkeypatch):
    "The optimizer steps with lr_at(t) for every iteration t: the schedule is per step, not epoch."
    seen = []                                     # the learning rate of each group at each step

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    cfg = TrainConfig(**TINY, model="vit", epochs=2, warmup_epochs=1, out_dir=str(tmp_path))
    train(cfg, progress=False, log=False)
    per_epoch = len(get_dataset("digits", split="train")) // cfg.batch_size   # drop_last
    total = cfg.epochs * per_epoch
    assert len(seen) == total
    expected = [lr_at(t, total, per_epoch, cfg.lr, cfg.min_lr) for t in range(total)]
    assert all(a != b for a, b in zip(expected, expected[1:]))   # it changes at every step
    for t, lrs in enumerate(seen):
        assert lrs == [pytest.approx(expected[t], rel=1e-12)] * 2, t   # both AdamW groups


class Recorder(nn.Module):
    "A model with sharp logits (×10, so that the targets matter) that records its training steps."

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.inputs, self.logits = model, [], []

    def forward(self, x):
        out = 10 * self.model(x)
        if self.training:
            self.inputs.append(x.clone())
            self.logits.append(out.detach().clone())
        return out


def _train_recorded(tmp_path, seed=0) -> tuple[Recorder, list, float]:
    "One epoch on the digits: the recorder, the loader's (x, y) batches of that epoch, train_loss."
    torch.manual_seed(seed)
    rec = Recorder(create_model("vit", image_size=16, preset="tiny", in_chans=1))
    cfg = TrainConfig(**TINY, epochs=1, warmup_epochs=0, seed=seed, out_dir=str(tmp_path))
    train(cfg, model=rec, progress=False, log=False)
    loader, _, _ = get_device_loaders("digits", image_size=16, batch_size=64, seed=seed)
    loader.set_epoch(0)                           # the same loader as train's: the same batches
    batches = list(loader)
    assert len(batches) == len(rec.inputs)
    for (x, _), seen in zip(batches, rec.inputs): assert torch.equal(x, seen)
    history = load_checkpoint(tmp_path / "checkpoint.pt")["history"]
    return rec, batches, history[0]["train_loss"]


def _mean_loss(rec: Recorder, batches: list, smoothing: float) -> float:
    "Mean over the epoch's images of the cross-entropy of the recorded logits."
    total = sum(F.cross_entropy(z, y, label_smoothing=smoothing).item() * len(y)
                for z, (_, y) in zip(rec.logits, batches))
    return total / sum(len(y) for _, y in batches)


def test_label_smoothing_reaches_the_loss(tmp_path):
    "The digits recipe's label smoothing 0.1 is in the loss the trainer reports and optimises."
    rec, batches, train_loss = _train_recorded(tmp_path)
    assert all(y.ndim == 1 for _, y in batches)   # no mixing in the digits recipe: hard labels
    smoothed, plain = _mean_loss(rec, batches, 0.1), _mean_loss(rec, batches, 0.0)
    assert abs(smoothed - plain) > 1e-3           # 50 times the rounding of train_loss
    assert train_loss == pytest.approx(smoothed, abs=2e-5)   # train_loss is rounded to 5 places


def test_soft_mixup_cutmix_targets_reach_the_loss(tmp_path, monkeypatch):
    "With every batch mixed, the loss is the cross-entropy with the two-class soft targets."
    mixing = AugmentConfig(crop_padding=0, flip=False, autoaugment=None, random_erasing=0.0,
                           mix_prob=1.0, label_smoothing=0.1)
    monkeypatch.setattr(data, "default_augment", lambda name, image_size=None: mixing)
    rec, batches, train_loss = _train_recorded(tmp_path)
    for _, y in batches:
        assert y.shape == (64, 10)
        torch.testing.assert_close(y.sum(1), torch.ones(64))
        assert ((y > 0).sum(1) <= 2).all()        # λ on one class, 1 - λ on another
    two = torch.cat([y for _, y in batches])
    two = two[(two > 0).sum(1) == 2]
    assert len(two) > 0 and (two.max(1).values < 1).all()   # some targets are truly mixed
    hard = [(x, y.argmax(1)) for x, y in batches]
    soft, argmax = _mean_loss(rec, batches, 0.1), _mean_loss(rec, hard, 0.1)
    assert abs(soft - argmax) > 1e-3              # 50 times the rounding of train_loss
    assert train_loss == pytest.approx(soft, abs=2e-5)


def test_test_loader_is_not_augmented():
    "Test batches are the normalised raw images in order, the same in every epoch."
    recipe = AugmentConfig(autoaugment=None, random_erasing=0.25, mix_prob=1.0)   # all but AA
    train_dl, test_dl, info = get_device_loaders("digits", image_size=16, batch_size=64,
                                                 augment=recipe)
    first = list(train_dl)
    train_dl.set_epoch(1)
    assert not torch.equal(first[0][0], next(iter(train_dl))[0])   # the training side augments
    images, labels = to_tensors(get_dataset("digits", split="test", image_size=16))
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    expected = (images.float() / 255 - mean[:, None, None]) / std[:, None, None]
    passes = []
    for epoch in (0, 1):
        test_dl.set_epoch(epoch)
        passes.append(list(test_dl))
    for a, b in zip(*passes):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = torch.cat([b[0] for b in passes[0]]), torch.cat([b[1] for b in passes[0]])
    assert torch.equal(y, labels)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
