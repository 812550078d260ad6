"""Prediction figures: the grid and its column headers."""

import numpy as np

from semijax.eval import visualize


def test_headers_sit_above_their_columns():
  images = np.zeros((2, 10, 12, 3), np.uint8)
  labels = np.ones((2, 10, 12), np.uint8)
  palette = np.array([[0, 0, 0], [0, 255, 0]], np.uint8)
  grid = visualize.prediction_grid(images, labels, {"teacher": labels, "student": labels},
                                   palette, scale=4)
  titles = visualize.column_titles(["teacher", "student"])
  assert titles == ["image", "ground truth", "teacher", "student"]
  width = (12 + visualize.SEPARATOR) * 4
  assert grid.shape == (80, 4 * width, 3)
  out = visualize.add_column_headers(grid, titles, width)
  assert out.shape == (80 + visualize.HEADER_HEIGHT, grid.shape[1], 3)
  np.testing.assert_array_equal(out[visualize.HEADER_HEIGHT:], grid)   # the grid is untouched
  band = out[:visualize.HEADER_HEIGHT]
  for column in range(4):   # dark title pixels inside every column's part of the band
    part = band[:, column * width:(column + 1) * width]
    assert (part.min(axis=-1) < 128).sum() > 10, column
  # A title longer than its column is shortened, not drawn into the next one.
  narrow = visualize.add_column_headers(grid[:, :2 * 20], ["a very long column title", "b"], 20)
  assert (narrow[:visualize.HEADER_HEIGHT, 17:20].min(axis=-1) > 128).all()
