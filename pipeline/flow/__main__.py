"""``python -m pipeline.flow``: the Prefect flow's command line (:func:`pipeline.flow.main`).

The flow objects come from ``pipeline.flow`` itself (not ``__main__``): served deployments load them by that path.
"""

from pipeline.flow import main

raise SystemExit(main())
