"""Reading what a run left on disk: the run folder, its statistics, the report, the planner.

Everything here reads result files only (``results``), so a run folder copied to
another machine gives the same report and plan; nothing here deploys or measures.
"""
