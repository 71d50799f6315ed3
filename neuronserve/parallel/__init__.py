"""Tensor parallelism: head layouts (``heads``, pure Python), process groups (``group``) and the
parallel layers the model is built from (``layers``). Import the submodule you need: ``heads`` is
importable without torch, so sizing code (fit checks, the simulator) can use it anywhere."""
