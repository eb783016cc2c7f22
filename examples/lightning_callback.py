"""ActGen as a PyTorch Lightning callback: after each early epoch the callback posts the held-out
images the model gets wrong; the generated images that arrive join the next epoch's training data
(train_dataloader asks the callback, and the Trainer reloads loaders every epoch). Needs a
generator at ACTGEN_GENERATOR_URL (ACTGEN_API_KEY if it has one); prints its counts as JSON."""

import argparse
import json

import lightning.pytorch as L
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from actgen_shared.architectures import build_classifier
from actgen_shared.digits import load_digits_split
from actgen_shared.labels import DIGITS
from actgen_shared.lightning import ActGenCallback

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--out", help="write the counts here too")
args = parser.parse_args()
SIZE, MEAN, STD = 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

L.seed_everything(0, verbose=False)
digits = load_digits_split(SIZE)
x = (torch.from_numpy(digits.train_images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # normalised
labels = digits.train_labels.tolist()
real = list(zip(x[:200], labels[:200], strict=True))  # (image, int label) pairs
held_out = list(zip(x[200:300], labels[200:300], strict=True))  # where the mistakes are mined


def normalise(image):  # a generated image (PIL) gets the real images' normalisation
    return (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5


actgen = ActGenCallback(
    held_out,
    images_per_epoch=8,
    classes=DIGITS,
    architecture="simple_cnn",
    image_size=SIZE,
    mean=MEAN,
    std=STD,
    transform=normalise,
    options={"num_inference_steps": 2, "grad_steps": 1, "height": 64, "width": 64, "bank_sample": 16},
    classifier=lambda module: module.net,  # the registry network inside the LightningModule
)


class Digits(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_classifier("simple_cnn", len(DIGITS))
        self.train_sizes: list[int] = []

    def forward(self, images):
        return self.net(images)

    def training_step(self, batch, _):
        images, targets = batch
        return F.cross_entropy(self(images), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):  # called every epoch: the real images plus what has arrived
        data = actgen.train_dataset(real)
        self.train_sizes.append(len(data))
        return DataLoader(data, batch_size=50, shuffle=True)


module = Digits()
trainer = L.Trainer(
    max_epochs=args.epochs,
    reload_dataloaders_every_n_epochs=1,  # needed: the generated images join each epoch's loader
    callbacks=[actgen],
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(module)
counts = {
    "real": len(real),
    "posted": sum(row["posted"] for row in actgen.history),
    "arrived": actgen.history[-1]["arrived"],
    "train_sizes": module.train_sizes,
    "final_train_size": module.train_sizes[-1],
}
print(json.dumps(counts))
if args.out:
    open(args.out, "w").write(json.dumps(counts))
