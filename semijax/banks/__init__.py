"""Memory banks as pytrees with pure init/push/read functions."""

from semijax.banks import alonso as alonso, csc, fifo, queue
from semijax.banks.fifo import ClassBank

__all__ = ["alonso", "csc", "fifo", "queue", "ClassBank"]
