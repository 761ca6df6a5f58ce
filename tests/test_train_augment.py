"""The command's training loop applies a recipe's augmentation (Miconi 2021's horizontal flips):
every image is seen as itself or as its mirror, about half mirrored, reproducibly from the seed and
identically after an interruption and resume."""
import torch
from torch import nn

from hebbloss.cli.train import TrainState, run_training


class _Seen(nn.Module):
    """Records every batch it is given; no parameters to learn, so the loop's optimizer is a no-op."""

    def __init__(self):
        super().__init__()
        self.batches = []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.batches.append(x.detach().clone())
        return x


class _NoPlasticity:
    def __init__(self, model):
        self.model = model

    def loss(self):
        return self.model.w * 0.0


def _train(images, augment, seed=0, max_steps=None, state=None, generator=None):
    model = _Seen()
    opt = torch.optim.SGD([model.w], lr=0.0)
    generator = generator or torch.Generator().manual_seed(seed)
    state = state or TrainState()
    run_training(model, _NoPlasticity(model), opt, images, lambda x: x.double(), epochs=2, batch_size=3,
                 generator=generator, state=state, save=lambda s: None, max_steps=max_steps, progress=False,
                 augment=augment)
    return torch.cat(model.batches), state, generator


def _images(n=16):
    return torch.randint(0, 256, (n, 1, 2, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_hflip_shows_each_image_or_its_mirror_and_mirrors_about_half():
    images = _images()
    seen, _, _ = _train(images, "hflip")
    plain = images.double()
    mirrored = 0
    for x in seen:
        same = [bool((x == p).all()) for p in plain]
        flipped = [bool((x == p.flip(-1)).all()) for p in plain]
        assert any(same) or any(flipped)
        mirrored += any(flipped) and not any(same)
    assert len(seen) == 2 * len(images)
    assert 4 <= mirrored <= 28  # 32 draws with p = 1/2


def test_no_augmentation_shows_the_images_unchanged():
    images = _images()
    seen, _, _ = _train(images, None)
    plain = images.double()
    assert all(any(bool((x == p).all()) for p in plain) for x in seen)


def test_flips_are_the_same_after_an_interruption_and_resume():
    images = _images()
    whole, _, _ = _train(images, "hflip", seed=5)
    first, state, generator = _train(images, "hflip", seed=5, max_steps=4)
    rest, _, _ = _train(images, "hflip", state=state, generator=generator)
    assert torch.equal(torch.cat([first, rest]), whole)
