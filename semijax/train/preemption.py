"""Preemption and signals: SIGTERM/SIGINT become a checkpoint at the next step boundary.

A single process turns the signal into a flag (a second signal aborts at once); several
processes agree on the step through JAX's preemption service, so that every process saves
the same step and none waits in a collective forever.
"""

import signal

import jax
from absl import logging


class Preemption:
  """Turns SIGTERM/SIGINT into a flag checked at step boundaries; a second signal aborts.

  With several processes every process must stop at the same step (else the others wait
  in the next step's collectives forever), so the flag is not set by a local signal but
  by JAX's preemption service (`jax.distributed`: a SIGTERM to any process is propagated
  and all agree on a step, `reached_preemption_sync_point`), polled with `poll(step)`;
  SIGINT keeps its default (the run aborts; resume from the last checkpoint).
  """

  def __init__(self):
    self.requested = False
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def poll(self, step: int) -> bool:
    """Whether to stop after `step` (called by every process at every step boundary)."""
    if self._multiprocess and not self.requested:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:   # preemption service disabled (jax_enable_preemption_service)
        pass
      if self.requested and jax.process_index() == 0:
        print(f"[semijax] preemption notice: saving a checkpoint at step {step}", flush=True)
    return self.requested

  def __enter__(self):
    if self._multiprocess:
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # second signal: the previous behaviour (KeyboardInterrupt, exit)
      self.__exit__()
      signal.raise_signal(signum)
      return
    logging.warning("signal %d: saving a checkpoint at the next step boundary", signum)
    print(f"[semijax] signal {signum}: saving a checkpoint at the next step boundary, then "
          "exiting (send it again to abort now)", flush=True)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
