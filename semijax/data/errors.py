"""The data package's bottom layer: the ignore label value and the error users fix.

Every other module of `semijax.data` imports these (through here or `sources`), so file
readers (`image_io`) and sources need not import each other.
"""

IGNORE_INDEX = 255


class DataError(ValueError):
  """A dataset file, split or record is not what it should be; the message names it."""
