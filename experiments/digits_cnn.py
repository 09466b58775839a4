"""scikit-learn's 8x8 digits with a small CNN: three 3x3 convolutions with batch norm and
ReLU, two max pools, dropout and a dense head; Adam with a cosine learning-rate decay."""

import optax

from fbp import data, losses, nn
from fbp.run import Experiment


def model(ds) -> nn.Sequential:
    return nn.Sequential(
        [
            nn.Reshape((8, 8, 1)),  # data.load gives (n, 64) standardised pixels
            nn.Conv2D(32, 3, use_bias=False),  # batch norm's bias replaces the conv's
            nn.BatchNorm(),
            nn.ReLU(),
            nn.Conv2D(32, 3, use_bias=False),
            nn.BatchNorm(),
            nn.ReLU(),
            nn.MaxPool2D(2),  # (n, 4, 4, 32)
            nn.Conv2D(64, 3, use_bias=False),
            nn.BatchNorm(),
            nn.ReLU(),
            nn.MaxPool2D(2),  # (n, 2, 2, 64)
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Dense(ds.classes),
        ]
    )


EXPERIMENT = Experiment(
    name="digits-cnn",
    description="8x8 digits, CNN (3 conv+BN+ReLU, 2 max pools, dropout), Adam, 30 epochs",
    data=lambda seed: data.load("digits", seed=seed),
    model=model,
    loss=losses.softmax_cross_entropy,
    optimizer=lambda lr, steps: optax.adam(optax.cosine_decay_schedule(lr, steps)),
    epochs=30,
    lr=2e-3,
    batch_size=32,
    log_every=5,
)
