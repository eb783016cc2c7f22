"""ActGen's lab: research tools apart from the product (docs/ablation.md).

The testbeds (the digits on backgrounds: :mod:`actgen_lab.backgrounds`), the ablation harness
(``actgen-lab ablate``), the oracle generator (:mod:`actgen_lab.oracle`), and the tiny models'
training and evaluation (``actgen-lab train-tiny-model``, ``actgen-lab eval-model``). The
generator, trainer and shared packages never import it; the trainer finds the lab's data sets
through the ``actgen_trainer.datasets`` entry points (:mod:`actgen_lab.sources`).
"""
