"""Reports comparing finished runs: tables, seed statistics, forgetting, figures and a self-contained page.

    from ilseg.reports import write_report
    write_report(["runs/finetune", "runs/ilt"], "report")   # report.md, report.html, report.json, *.png
"""

from ilseg.reports.collect import Group, Run, Stat, collect, forgetting, hiou
from ilseg.reports.page import write_report

__all__ = ["Group", "Run", "Stat", "collect", "forgetting", "hiou", "write_report"]
