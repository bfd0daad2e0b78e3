"""Side-by-side panels: an image, its ground truth and predictions, in the dataset's palette.

A figure is a grid of panels.  Each row shows one image; each panel of a row
is either the image itself (``HxWx3`` ``uint8`` RGB) or a label mask
(``HxW`` integers, dataset class ids, 255 = ignore) drawn in the VOC palette
of :func:`ilseg.data.io.palette`, colour for colour.  Every panel of a row
has the same size and position on the same pixel grid (widths are equal in
every row), a title above it, and no axes.  One legend below all panels
names the classes that appear in any mask.

Rendering uses matplotlib's Agg canvas directly: no display and no global
``pyplot`` state.  Example::

    >>> figure = panel_figure([[("image", rgb), ("ground truth", gt), ("ilt step 2", pred)]],
    ...                       task.class_names)
    >>> atomic_write_bytes("panel.png", lambda f: f.write(figure_png(figure)))

or, for one image, :func:`render_panels`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ilseg.data.io import colorize
from ilseg.fileio import atomic_write_bytes
from ilseg.tasks import IGNORE_INDEX
from ilseg.visual.style import MethodStyle

DPI = 100  # pixels per inch of the PNG: every size below is in PNG pixels
PANEL_WIDTH = 256  # width of every panel; its height follows the image's aspect ratio
MARGIN = 12  # around the grid
GAP = 10  # between two panels of a row
TITLE_BAND = 26  # above each row, for the panels' titles
LEGEND_GAP = 8  # between the last row and the legend
TITLE_SIZE = 11  # points
LEGEND_SIZE = 10  # points
IGNORE_NAME = "ignore"

Column = tuple[str, np.ndarray]  # (title, HxWx3 uint8 image or HxW label mask of dataset ids)


def render_panels(image: np.ndarray, columns: Sequence[Column], class_names: Sequence[str],
                  out_path: str | Path, *, colours: np.ndarray | None = None,
                  marks: Sequence[MethodStyle | None] = ()) -> Figure:
    """Write ``image`` followed by ``columns`` as one row of panels to the PNG ``out_path`` (atomically).

    Args:
        image: ``HxWx3`` ``uint8`` RGB, shown first with the title "image".
        columns: ``(title, mask)`` pairs, e.g. ``("ground truth", gt)``,
            ``("ilt step 2", prediction)``; each mask ``HxW`` dataset class
            ids (255 = ignore), the size of ``image``.
        class_names: the dataset's class names, indexed by class id (the
            legend's names).
        out_path: the PNG file.
        colours: the masks' ``256x3`` colours (default: VOC's;
            :func:`ilseg.data.io.dataset_colours` gives a dataset's).
        marks: per column, the style of the method that predicted it (or
            ``None``): its marker, in its colour, is drawn before the title,
            as the method is drawn in reports.

    Returns the figure (for inspection; it is not shown anywhere).
    """
    figure = panel_figure([[("image", image), *columns]], class_names, colours=colours, marks=[None, *marks])
    png = figure_png(figure)
    atomic_write_bytes(out_path, lambda f: f.write(png))
    return figure


def panel_figure(rows: Sequence[Sequence[Column]], class_names: Sequence[str], *,
                 panel_width: int = PANEL_WIDTH, colours: np.ndarray | None = None,
                 marks: Sequence[MethodStyle | None] = ()) -> Figure:
    """A figure of ``rows`` of panels with titles and one legend below them all.

    Args:
        rows: each row a sequence of ``(title, array)``: an ``HxWx3`` ``uint8``
            array is drawn as an image, an ``HxW`` array as a label mask of
            dataset class ids in the palette.  The arrays of one row must
            share ``H`` and ``W``; every row must have the same number of
            panels.
        class_names: the dataset's class names, indexed by class id.
        panel_width: the width of every panel in PNG pixels.
        colours: the masks' ``256x3`` colours (default: VOC's palette).
        marks: per column, a method's style (or ``None``): its marker and
            colour are drawn left of that column's titles.

    The panels are placed on whole pixels, so pixel ``(x, y)`` of panel
    ``(r, c)`` in the PNG is ``figure.axes[r * num_columns + c]``'s box plus
    the image's own pixel scaled by ``panel_width / W`` (nearest neighbour:
    a mask's colours are exactly the palette's).
    """
    if not rows or not rows[0]:
        raise ValueError("panel_figure needs at least one row with one panel")
    num_columns = len(rows[0])
    heights = [_row_height(row, num_columns, panel_width) for row in rows]
    present = sorted({int(v) for row in rows for _, array in row if array.ndim == 2 for v in np.unique(array)})
    width = 2 * MARGIN + num_columns * panel_width + (num_columns - 1) * GAP
    grid_height = MARGIN + sum(TITLE_BAND + h for h in heights) + (LEGEND_GAP if present else 0)

    figure = Figure(figsize=(_inches(width), _inches(grid_height + MARGIN)), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)
    panels: list[tuple[Axes, int]] = []
    for row, height in zip(rows, heights):
        for title, array in row:
            ax = figure.add_axes((0.0, 0.0, 1.0, 1.0))  # placed by _place
            if array.ndim == 2:  # labels: nearest neighbour keeps every pixel an exact palette colour
                ax.imshow(colorize(array, colours), interpolation="nearest", aspect="auto")
            else:  # a photo: smoothed when shrunk (nearest when enlarged a lot)
                ax.imshow(array, interpolation="antialiased", aspect="auto")
            ax.set_title(title, fontsize=TITLE_SIZE, pad=4)
            ax.set_axis_off()
            panels.append((ax, height))
    legend_height = _add_legend(figure, present, class_names, width, colours) if present else 0
    total = grid_height + legend_height + MARGIN
    figure.set_size_inches(_inches(width), _inches(total))
    _place(figure, panels, num_columns, panel_width, total, grid_height)
    _mark_titles(figure, [ax for ax, _ in panels], num_columns, marks)
    return figure


def _inches(pixels: int) -> float:
    """A figure size that renders at exactly ``pixels`` PNG pixels.

    ``pixels / DPI`` times ``DPI`` can come out a hair below ``pixels`` (812 / 100 * 100 is
    811.99...), and matplotlib before 3.11 truncates the canvas size to whole pixels, one pixel
    short; a millionth of a pixel more truncates to ``pixels`` in every version.
    """
    return (pixels + 1e-6) / DPI


def figure_png(figure: Figure) -> bytes:
    """The PNG bytes of ``figure`` at :data:`DPI` (no cropping: the layout's pixel positions hold)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return buffer.getvalue()


def legend_entries(labels: Sequence[int], class_names: Sequence[str],
                   colours: np.ndarray | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, (r, g, b))`` of each label value, in order (in ``colours``, default VOC's); 255 is named
    "ignore".

    >>> legend_entries([0, 1, 255], ("background", "aeroplane"))
    [('background', (0, 0, 0)), ('aeroplane', (128, 0, 0)), ('ignore', (224, 224, 192))]
    """
    drawn = colorize(np.asarray(labels, dtype=np.uint8)[None], colours)[0]
    entries = []
    for value, colour in zip(labels, drawn):
        if value == IGNORE_INDEX:
            name = IGNORE_NAME
        elif value < len(class_names):
            name = class_names[value]
        else:
            name = f"class {value}"
        entries.append((name, (int(colour[0]), int(colour[1]), int(colour[2]))))
    return entries


def _row_height(row: Sequence[Column], num_columns: int, panel_width: int) -> int:
    """The pixel height of a row's panels (the row's image aspect at ``panel_width``); checks the row."""
    if len(row) != num_columns:
        raise ValueError(f"every row needs {num_columns} panels, got one of {len(row)}")
    shapes = {array.shape[:2] for _, array in row}
    for title, array in row:
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            raise ValueError(f"panel {title!r} is neither an HxWx3 image nor an HxW mask: shape {array.shape}")
    if len(shapes) != 1:
        raise ValueError(f"the panels of a row must share their size, got {sorted(shapes)} "
                         f"({', '.join(title for title, _ in row)})")
    height, width = shapes.pop()
    return max(1, round(panel_width * height / width))


def _add_legend(figure: Figure, labels: Sequence[int], class_names: Sequence[str], width: int,
                colours: np.ndarray | None = None) -> int:
    """Add the legend (placed below the grid by :func:`_place`); return its height in pixels.

    As many columns as fit the figure's width: the legend is drawn and
    measured, with one column fewer until it fits.
    """
    entries = legend_entries(labels, class_names, colours)
    handles = [Patch(facecolor=(colour[0] / 255, colour[1] / 255, colour[2] / 255), edgecolor="0.4", linewidth=0.6, label=name)
               for name, colour in entries]
    renderer = FigureCanvasAgg(figure).get_renderer()
    for ncol in range(len(handles), 0, -1):
        legend = figure.legend(handles=handles, loc="upper center", ncol=ncol, frameon=False,
                               fontsize=LEGEND_SIZE, handlelength=1.4, handleheight=1.4, columnspacing=1.4,
                               borderaxespad=0.0, borderpad=0.2)
        box = legend.get_window_extent(renderer)
        if box.width <= width - 2 * MARGIN or ncol == 1:
            break
        legend.remove()
    return int(np.ceil(box.height)) + 2


def _place(figure: Figure, panels: Sequence[tuple[Axes, int]], num_columns: int, panel_width: int,
           total: int, grid_height: int) -> None:
    """Put each panel's axes on whole pixels of a ``total``-pixel-high figure, and the legend below the grid."""
    width = figure.get_size_inches()[0] * DPI
    top = MARGIN
    for index, (ax, height) in enumerate(panels):
        column = index % num_columns
        if column == 0:
            top += TITLE_BAND
        left = MARGIN + column * (panel_width + GAP)
        bottom = total - top - height  # matplotlib counts from the bottom
        ax.set_position((left / width, bottom / total, panel_width / width, height / total))
        if column == num_columns - 1:
            top += height
    for legend in figure.legends:
        legend.set_bbox_to_anchor((0.5, 1.0 - grid_height / total), transform=figure.transFigure)


def _mark_titles(figure: Figure, axes: Sequence[Axes], num_columns: int, marks: Sequence[MethodStyle | None]) -> None:
    """Draw each marked column's method marker, in its colour, as a short line left of its titles."""
    if not any(marks):
        return
    figure.draw_without_rendering()  # lays the titles out, so their extents are known
    width, height = figure.get_size_inches() * DPI
    for index, ax in enumerate(axes):
        style = marks[index % num_columns] if index % num_columns < len(marks) else None
        if style is None:
            continue
        box = ax.title.get_window_extent()
        x, y = box.x0 - 16, (box.y0 + box.y1) / 2
        figure.add_artist(Line2D([(x - 9) / width, x / width, (x + 9) / width], [y / height] * 3,
                                 transform=figure.transFigure, color=style.colour, marker=style.marker,
                                 markersize=7, linewidth=2, linestyle=style.dashes, markevery=[1]))
