"""Everything that runs a model to measure or improve it, above the engine and below the server.

* exit training (``helios-ray tune-exits``): :mod:`.run` ties the phases together - :mod:`.cache` (teacher
  activations on disk), :mod:`.train`, :mod:`.calibration` - with its settings in :mod:`.config`;
* evaluation: :mod:`.exit_eval` (agreement, calibration and the exit card, ``helios-ray eval-exits``) and
  :mod:`.code_eval` (HumanEval pass@1, sandboxed);
* profiling: :mod:`.profiling` (a candidate's PHT record and its memory/cost facts for the policy) and
  ``helios-ray profile`` (:mod:`.profile_cli`).

Nothing here imports Ray: the serving layer calls in (the brain and the profiler deployment use :mod:`.profiling`).
"""
