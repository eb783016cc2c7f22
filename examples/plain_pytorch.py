"""ActGen in a plain PyTorch loop: each early epoch, post the held-out images the model gets wrong;
the generated images that arrive join the training set. Needs a generator at ACTGEN_GENERATOR_URL
(`actgen-generator serve`; ACTGEN_API_KEY if it has one). Prints its counts as JSON (or --out FILE)."""

import argparse
import json

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from actgen_shared.architectures import build_classifier
from actgen_shared.digits import load_digits_split
from actgen_shared.labels import DIGITS
from actgen_shared.run import ActGenRun

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--out", help="write the counts here too")
args = parser.parse_args()
SIZE, EPOCHS = 16, args.epochs

torch.manual_seed(0)
digits = load_digits_split(SIZE)
x = torch.from_numpy(digits.train_images).permute(0, 3, 1, 2).float() / 255  # N x 3 x 16 x 16 in [0, 1]
y = torch.from_numpy(digits.train_labels)
real = TensorDataset(x[:200], y[:200])  # (image, tensor label) pairs; the generated ones batch with them
hard_x, hard_y = x[200:300], y[200:300]  # held out: where the mistakes are mined
model = build_classifier("simple_cnn", len(DIGITS))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
fast = {"num_inference_steps": 2, "grad_steps": 1, "height": 64, "width": 64, "bank_sample": 16}  # CPU demo

counts: dict = {"real": len(real), "posted": 0}
# epochs=: the jobs follow the paper's ramp of adversarial guidance (the model is uploaded when
# it is needed); images_per_epoch caps what is posted; generating() is the first half of the run
run = ActGenRun(classes=DIGITS, architecture="simple_cnn", image_size=SIZE, options=fast, seed=0,
                epochs=EPOCHS, images_per_epoch=8)  # fmt: skip
with run:
    for epoch in range(EPOCHS):
        if epoch == run.drain_epoch:
            run.drain(timeout_s=120, epoch=epoch)  # once, after the last post: wait for what is out
        run.refresh(epoch)  # what arrived since the last epoch
        train = run.train_dataset(real)  # real + what arrived, its labels served as real's are
        model.train()
        for images, labels in DataLoader(train, batch_size=50, shuffle=True):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if run.generating(epoch):
            model.eval()
            with torch.no_grad():
                probs = model(hard_x).softmax(1)
            wrong = (probs.argmax(1) != hard_y).nonzero().flatten()  # the mistakes are the hard samples
            sub = run.submit(hard_x[wrong], hard_y[wrong], epoch=epoch, model=model,
                             confidences=probs[wrong, hard_y[wrong]])  # fmt: skip
            counts["posted"] += sub.posted
    counts.update(arrived=len(run.dataset), final_train_size=len(train), run_id=run.run_id)
print(json.dumps(counts))
if args.out:
    open(args.out, "w").write(json.dumps(counts))
