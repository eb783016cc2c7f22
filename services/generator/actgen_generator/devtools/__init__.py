"""Dev tools behind CLI subcommands, not used by the service: training the tiny digits model
(``train-tiny-model``) and scoring a model's samples (``eval-model``)."""
