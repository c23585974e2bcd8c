"""Helpers of `examples/fashion_mnist_study.py`: one module per concern.

- `common`: data, the ResNet, training, accuracy, costs, LiteRT conversion;
- `psp_runs`: PSP with weight decay or L1 on α, steered by `FlopsBudget`;
- `baselines`: the ℓ1-norm filter criterion and BN-scale (network slimming);
- `tfmot_run`: tensorflow-model-optimization in tf_keras, its own process;
- `report`: interleaved LiteRT latency, figures and RESULTS.md.
"""
