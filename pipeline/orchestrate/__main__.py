"""``python -m pipeline.orchestrate run [-t target ...] [-f] [-j N]``: the local runner (:mod:`.local`)."""

from pipeline.orchestrate.local import main

raise SystemExit(main())
