"""A performance model of Inferentia2 / Trainium (and of the measured host CPU) that drives the
real ``Scheduler`` on a virtual clock and reports with the benchmark's own metric code.

Imports only the standard library, ``neuronserve.core``, ``neuronserve.bench`` and the
standard-library modules ``config``, ``hardware`` and ``presets``: no torch. Predictions, not
measurements: ``docs/simulator.md`` gives the fitted factors and the errors against measured runs.
"""
