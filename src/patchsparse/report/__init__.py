"""Markdown reports with PNG figures for a run directory."""

from patchsparse.report.build import build_report

__all__ = ["build_report"]
