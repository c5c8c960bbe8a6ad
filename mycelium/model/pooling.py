"""The pooling choices and the default, without imports, so config and serving both read them for free."""

POOLINGS: tuple[str, ...] = ("last", "mean")
# Mean over real tokens for every backbone: on SmolLM2 it beat last-token pooling on C4, C5 and C6 and
# lost on C4 at 2.6% BRIDGING (bench/quality/results-smollm2.md); encoders were always mean-pooled.
DEFAULT_POOLING = "mean"
