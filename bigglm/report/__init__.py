"""What a run leaves behind for people: the provenance record and the on-screen summary."""

from __future__ import annotations

from bigglm.report.provenance import environment, file_record, sha256_file, write_json_atomic
from bigglm.report.summary import format_summary

__all__ = ["environment", "file_record", "format_summary", "sha256_file", "write_json_atomic"]
