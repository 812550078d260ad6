"""Memory banks as pytrees with pure init/push/read functions."""

from semijax.banks import alonso as alonso
from semijax.banks import csc
from semijax.banks import fifo
from semijax.banks import queue
from semijax.banks.fifo import ClassBank

__all__ = ["fifo", "ClassBank"]
