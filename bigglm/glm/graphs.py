"""Task graphs written out by hand, in Dask's documented graph format.

The fit and the residuals are a few kinds of task per chunk (statistics, a tree of
combines, a finish per voxel block; a residual chunk with the rows above it). Writing
those tasks into one dictionary, as Dask's graph specification describes (a key maps to
a tuple whose first item is a callable, the other items arguments in which keys stand
for the outputs of other tasks), costs microseconds per task, where building them with
``dask.delayed`` tokenised every call. The dictionary is then merged with the graphs of
the arrays it reads, through the collection protocol (``__dask_graph__``), and handed to
the public constructors ``dask.array.Array`` and ``dask.delayed.Delayed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["with_inputs"]


def with_inputs(tasks: Mapping[Any, Any], *inputs: Any) -> dict[Any, Any]:
    """One graph: the tasks of every input collection, then ``tasks``.

    Parameters
    ----------
    tasks : mapping
        Keys to tasks, in Dask's graph format.
    *inputs : dask collections
        The arrays (or delayed objects) whose keys ``tasks`` refer to.

    Returns
    -------
    dict
        A graph for ``dask.array.Array(graph, name, chunks, dtype)`` or
        ``dask.delayed.Delayed(key, graph)``.

    Examples
    --------
    >>> import dask.array as da
    >>> from operator import add
    >>> x = da.ones(4, chunks=2, name="x")
    >>> graph = with_inputs({("y", 0): (add, ("x", 0), 1), ("y", 1): (add, ("x", 1), 1)}, x)
    >>> da.Array(graph, "y", x.chunks, dtype=x.dtype).compute()
    array([2., 2., 2., 2.])
    """
    graph: dict[Any, Any] = {}
    for collection in inputs:
        graph.update(collection.__dask_graph__())
    graph.update(tasks)
    return graph
